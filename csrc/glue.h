// Tensor checks and conversions shared by the CPU and CUDA op glue. The Python layer gives
// users friendly errors first; these TORCH_CHECKs are the backstop for direct torch.ops calls.
#pragma once
#include <ATen/ATen.h>

#include "cpu/kernels.h"

namespace megapre::glue {

inline DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK(false, "megapre::", op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

inline DType out_dtype(at::ScalarType s, const char* op) {
  return float_dtype(at::empty({0}, at::TensorOptions().dtype(s)), op, "out_dtype");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, "megapre::", op, ": ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device() == b.device(), "megapre::", op, ": tensors on different devices (",
              a.device(), " vs ", b.device(), ")");
}

// Optional per-feature float parameter (gamma, beta, bias, ...) as contiguous float32 [n].
inline at::Tensor float_vector(const c10::optional<at::Tensor>& t, int64_t n, const at::Tensor& like,
                               const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "megapre::", op, ": ", name, " must have shape [",
              n, "], got ", t->sizes());
  float_dtype(*t, op, name);
  check_same_device(*t, like, op);
  return t->to(at::kFloat).contiguous();
}

// Size of the last dim of an elementwise op's input (the bias length); x must be at least 1-D.
inline int64_t last_dim(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 1, "megapre::", op, ": x must have at least 1 dim, got a scalar");
  return x.size(-1);
}

inline const float* fptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

inline void* vptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Bool mask broadcast to scores' [b, h, sq, sk]; strides of broadcast dims are 0.
inline at::Tensor expand_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& scores,
                              const char* op) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  TORCH_CHECK(mask->scalar_type() == at::kBool, "megapre::", op, ": mask must be bool, got ",
              mask->scalar_type());
  check_dim(*mask, 4, op, "mask");
  check_same_device(*mask, scores, op);
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(mask->size(d) == 1 || mask->size(d) == scores.size(d), "megapre::", op,
                ": mask of shape ", mask->sizes(), " does not broadcast to scores ", scores.sizes());
  }
  return mask->expand(scores.sizes());
}

struct NormShapes {
  int64_t rows, hidden;
};

inline NormShapes check_norm_input(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                   const char* op) {
  check_dim(x, 2, op, "x");
  float_dtype(x, op, "x");
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "megapre::", op, ": residual must match x (shape ", x.sizes(), ", dtype ",
                x.scalar_type(), "), got ", residual->sizes(), " ", residual->scalar_type());
    check_same_device(*residual, x, op);
  }
  return {x.size(0), x.size(1)};
}

inline void check_int8_gemm(const at::Tensor& x, const at::Tensor& xs, const at::Tensor& w,
                            const at::Tensor& ws, const char* op) {
  check_dim(x, 2, op, "x");
  check_dim(w, 2, op, "w");
  TORCH_CHECK(x.scalar_type() == at::kChar && w.scalar_type() == at::kChar, "megapre::", op,
              ": x and w must be int8, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(1), "megapre::", op, ": K mismatch, x is ", x.sizes(),
              " but w is ", w.sizes(), " ([N, K])");
  TORCH_CHECK(xs.scalar_type() == at::kFloat && xs.dim() == 1 && xs.size(0) == x.size(0),
              "megapre::", op, ": x_scale must be float32 [", x.size(0), "], got ", xs.scalar_type(),
              " ", xs.sizes());
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.dim() == 1 && ws.size(0) == w.size(0),
              "megapre::", op, ": w_scale must be float32 [", w.size(0), "], got ", ws.scalar_type(),
              " ", ws.sizes());
  check_same_device(x, w, op);
  check_same_device(x, xs, op);
  check_same_device(w, ws, op);
}

inline void check_weight_only(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                              const char* op) {
  check_dim(x, 2, op, "x");
  check_dim(w, 2, op, "w");
  float_dtype(x, op, "x");
  TORCH_CHECK(w.scalar_type() == at::kChar, "megapre::", op, ": w must be int8, got ", w.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(1), "megapre::", op, ": K mismatch, x is ", x.sizes(),
              " but w is ", w.sizes(), " ([N, K])");
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.dim() == 1 && ws.size(0) == w.size(0),
              "megapre::", op, ": w_scale must be float32 [", w.size(0), "], got ", ws.scalar_type(),
              " ", ws.sizes());
  check_same_device(x, w, op);
  check_same_device(w, ws, op);
}

}  // namespace megapre::glue
