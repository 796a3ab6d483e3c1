// The op glue shared by the CPU and CUDA implementations (csrc/cpu/ops_cpu.cpp,
// csrc/cuda/ops_cuda.cpp): argument checks, contiguous inputs and output allocation, one struct
// per op, so both devices accept the same arguments and give the same outputs; the device files
// keep only their kernel launches. The Python layer gives users friendly errors first; these
// TORCH_CHECKs are the backstop for direct torch.ops calls.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "cpu/kernels.h"

namespace megapre::glue {

inline DType to_dtype(at::ScalarType s, const char* op, const char* name) {
  switch (s) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK(false, "megapre::", op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  s);
  }
}

inline DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  return to_dtype(t.scalar_type(), op, name);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, "megapre::", op, ": ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
}

// Rows of a tensor that must be 2-D.
inline int64_t rows_2d(const at::Tensor& t, const char* op, const char* name) {
  check_dim(t, 2, op, name);
  return t.size(0);
}

// dtype of a float tensor that must have `dim` dims.
inline DType float_dtype(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  check_dim(t, dim, op, name);
  return float_dtype(t, op, name);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device() == b.device(), "megapre::", op, ": tensors on different devices (",
              a.device(), " vs ", b.device(), ")");
}

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Optional per-feature float parameter (gamma, beta, bias, ...) of shape [n]: checked here,
// converted by float_vector.
inline void check_vector(const c10::optional<at::Tensor>& t, int64_t n, const at::Tensor& like,
                         const char* op, const char* name) {
  if (!given(t)) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "megapre::", op, ": ", name, " must have shape [",
              n, "], got ", t->sizes());
  float_dtype(*t, op, name);
  check_same_device(*t, like, op);
}

// A checked optional parameter as contiguous float32 [n], or an undefined tensor.
inline at::Tensor float_vector(const c10::optional<at::Tensor>& t) {
  return given(t) ? t->to(at::kFloat).contiguous() : at::Tensor();
}

inline at::Tensor contiguous_or_none(const c10::optional<at::Tensor>& t) {
  return given(t) ? t->contiguous() : at::Tensor();
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
  if (!given(mask)) return at::Tensor();
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

// Checks x [rows, H] and the residual (or dsum) that must match it; returns rows.
inline int64_t check_norm_input(const at::Tensor& x,
                                const c10::optional<at::Tensor>& residual, const char* op) {
  check_dim(x, 2, op, "x");
  float_dtype(x, op, "x");
  if (given(residual)) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "megapre::", op, ": residual must match x (shape ", x.sizes(), ", dtype ",
                x.scalar_type(), "), got ", residual->sizes(), " ", residual->scalar_type());
    check_same_device(*residual, x, op);
  }
  return x.size(0);
}

// What both int8 GEMMs ask of w [N, K] and w_scale [N] against x [M, K] (2-D, checked).
inline void check_weights(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                          const char* op) {
  TORCH_CHECK(x.size(1) == w.size(1), "megapre::", op, ": K mismatch, x is ", x.sizes(),
              " but w is ", w.sizes(), " ([N, K])");
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.dim() == 1 && ws.size(0) == w.size(0),
              "megapre::", op, ": w_scale must be float32 [", w.size(0), "], got ", ws.scalar_type(),
              " ", ws.sizes());
  check_same_device(x, w, op);
  check_same_device(w, ws, op);
}

// ---- one struct per op: checks, contiguous inputs, outputs ----------------------------------
// The CPU and CUDA glue run the same steps: construct (checks the arguments, allocates
// nothing), alloc() (contiguous inputs, float32 parameters, outputs), then the kernel launch
// when launch() says there is work, and return outputs(). Between construction and alloc()
// the CUDA glue adds what only its kernels need (CUDA tensors, int32 index limits) and opens
// its device guard, so nothing is allocated for arguments it rejects or on the wrong device.
// An op on zero rows (or other empty input) returns its outputs without calling a kernel;
// statistics and sums over empty sets are filled in here.
// The structs hold references to the op's arguments: they live only inside the op call.

struct NormFwd {
  static constexpr const char* kOp = "norm_fwd";
  const at::Tensor& x_;
  const c10::optional<at::Tensor>& residual_;
  const c10::optional<at::Tensor>& weight_;
  const c10::optional<at::Tensor>& bias_;
  const int64_t rows, H;
  const DType dt;
  const float eps;
  const bool rms;
  at::Tensor x, r, gamma, beta, y, sum, mean, rstd;

  NormFwd(const at::Tensor& x_in, const c10::optional<at::Tensor>& residual,
          const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
          double eps_in, bool rms_in)
      : x_(x_in), residual_(residual), weight_(weight), bias_(bias),
        rows(check_norm_input(x_in, residual, kOp)), H(x_in.size(1)),
        dt(float_dtype(x_in, kOp, "x")), eps(static_cast<float>(eps_in)), rms(rms_in) {
    check_vector(weight, H, x_in, kOp, "weight");
    check_vector(bias, H, x_in, kOp, "bias");
  }

  void alloc() {
    x = x_.contiguous();
    r = contiguous_or_none(residual_);
    gamma = float_vector(weight_);
    beta = rms ? at::Tensor() : float_vector(bias_);  // RMSNorm has no shift
    y = at::empty_like(x);
    sum = r.defined() ? at::empty_like(x) : at::empty({0}, x.options());
    auto f32 = x.options().dtype(at::kFloat);
    mean = at::empty({rms ? 0 : rows}, f32);
    rstd = at::empty({rows}, f32);
    if (rows > 0 && H == 0) {  // statistics of an empty row: 0 / 0
      mean.fill_(std::numeric_limits<float>::quiet_NaN());
      rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    }
  }
  bool launch() const { return x.numel() > 0; }
  const void* residual_ptr() const { return vptr(r); }
  void* sum_ptr() const { return r.defined() ? sum.data_ptr() : nullptr; }
  float* mean_ptr() const { return rms ? nullptr : mean.data_ptr<float>(); }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {y, sum, mean, rstd};
  }
};

struct NormBwd {
  static constexpr const char* kOp = "norm_bwd";
  const at::Tensor &dy_, &xin_, &mean_, &rstd_;
  const c10::optional<at::Tensor>& dsum_;
  const c10::optional<at::Tensor>& weight_;
  const int64_t rows, H;
  const DType dt;
  const bool rms, weight_grad, bias_grad;
  at::Tensor dy, dsum, xin, gamma, mean, rstd, dx, dgamma, dbeta;

  NormBwd(const at::Tensor& dy_in, const c10::optional<at::Tensor>& dsum_in,
          const at::Tensor& xin_in, const c10::optional<at::Tensor>& weight,
          const at::Tensor& mean_in, const at::Tensor& rstd_in, bool rms_in, bool wg, bool bg)
      : dy_(dy_in), xin_(xin_in), mean_(mean_in), rstd_(rstd_in), dsum_(dsum_in), weight_(weight),
        rows(check_norm_input(xin_in, dsum_in, kOp)), H(xin_in.size(1)),
        dt(float_dtype(xin_in, kOp, "xin")), rms(rms_in), weight_grad(wg), bias_grad(bg) {
    TORCH_CHECK(dy_.sizes() == xin_.sizes() && dy_.scalar_type() == xin_.scalar_type(),
                "megapre::norm_bwd: dy must match xin");
    TORCH_CHECK(rstd_.numel() == rows && (rms || mean_.numel() == rows),
                "megapre::norm_bwd: mean/rstd must have ", rows, " elements");
    check_same_device(dy_, xin_, kOp);
    check_same_device(rstd_, xin_, kOp);
    if (!rms) check_same_device(mean_, xin_, kOp);
    check_vector(weight, H, xin_, kOp, "weight");
  }

  void alloc() {
    dy = dy_.contiguous();
    xin = xin_.contiguous();
    dsum = contiguous_or_none(dsum_);
    gamma = float_vector(weight_);
    mean = rms ? at::Tensor() : mean_.to(at::kFloat).contiguous();
    rstd = rstd_.to(at::kFloat).contiguous();
    dx = at::empty_like(xin);
    auto f32 = xin.options().dtype(at::kFloat);
    dgamma = at::empty({weight_grad ? H : 0}, f32);
    dbeta = at::empty({bias_grad ? H : 0}, f32);
    if (!launch()) {  // column sums over no rows (or of empty rows)
      dgamma.zero_();
      dbeta.zero_();
    }
  }
  bool launch() const { return xin.numel() > 0; }
  const float* mean_ptr() const { return rms ? nullptr : mean.data_ptr<float>(); }
  float* dgamma_ptr() const { return weight_grad ? dgamma.data_ptr<float>() : nullptr; }
  float* dbeta_ptr() const { return bias_grad ? dbeta.data_ptr<float>() : nullptr; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {dx, dgamma, dbeta}; }
};

struct SoftmaxFwd {
  static constexpr const char* kOp = "scale_mask_softmax_fwd";
  const at::Tensor& scores_;
  const c10::optional<at::Tensor>& mask_;
  const DType dt;
  const float scale;
  const bool causal;
  at::Tensor scores, mask, probs;
  int64_t mask_strides[4] = {0, 0, 0, 0};  // 0 for broadcast dims

  SoftmaxFwd(const at::Tensor& scores_in, const c10::optional<at::Tensor>& mask_in, double sc,
             bool causal_in)
      : scores_(scores_in), mask_(mask_in), dt(float_dtype(scores_in, 4, kOp, "scores")),
        scale(static_cast<float>(sc)), causal(causal_in) {}

  void alloc() {
    scores = scores_.contiguous();
    mask = expand_mask(mask_, scores, kOp);
    probs = at::empty_like(scores);
    if (!mask.defined()) return;
    for (int d = 0; d < 4; ++d) mask_strides[d] = mask.size(d) == 1 ? 0 : mask.stride(d);
  }
  bool launch() const { return scores.numel() > 0; }
  const bool* mask_ptr() const { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }
  int64_t size(int d) const { return scores.size(d); }
};

struct SoftmaxBwd {
  static constexpr const char* kOp = "scale_mask_softmax_bwd";
  const at::Tensor &grad_, &probs_;
  const DType dt;
  const float scale;
  const bool causal;
  at::Tensor grad, probs, dscores;

  SoftmaxBwd(const at::Tensor& grad_in, const at::Tensor& probs_in, double sc, bool causal_in)
      : grad_(grad_in), probs_(probs_in), dt(float_dtype(probs_in, 4, kOp, "probs")),
        scale(static_cast<float>(sc)), causal(causal_in) {
    TORCH_CHECK(grad_.sizes() == probs_.sizes() && grad_.scalar_type() == probs_.scalar_type(),
                "megapre::scale_mask_softmax_bwd: grad must match probs");
    check_same_device(grad_, probs_, kOp);
  }

  void alloc() {
    grad = grad_.contiguous();
    probs = probs_.contiguous();
    dscores = at::empty_like(probs);
  }
  bool launch() const { return probs.numel() > 0; }
  int64_t size(int d) const { return probs.size(d); }
};

struct BiasGeluFwd {
  static constexpr const char* kOp = "bias_gelu_fwd";
  const at::Tensor& x_;
  const c10::optional<at::Tensor>& bias_;
  const int64_t H;
  const DType dt;
  at::Tensor x, bias, y;

  BiasGeluFwd(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in)
      : x_(x_in), bias_(bias_in), H(last_dim(x_in, kOp)), dt(float_dtype(x_in, kOp, "x")) {
    check_vector(bias_in, H, x_in, kOp, "bias");
  }

  void alloc() {
    x = x_.contiguous();
    bias = float_vector(bias_);
    y = at::empty_like(x);
  }
  bool launch() const { return x.numel() > 0; }
  int64_t rows() const { return x.numel() / H; }
};

// dbias (when asked for) is the column sums of dx as stored: the CPU kernel fills it, the CUDA
// glue sums dx into it.
struct BiasGeluBwd {
  static constexpr const char* kOp = "bias_gelu_bwd";
  const at::Tensor &dy_, &x_;
  const c10::optional<at::Tensor>& bias_;
  const int64_t H;
  const DType dt;
  const bool bias_grad;
  at::Tensor dy, x, bias, dx, dbias;

  BiasGeluBwd(const at::Tensor& dy_in, const at::Tensor& x_in,
              const c10::optional<at::Tensor>& bias_in, bool bg)
      : dy_(dy_in), x_(x_in), bias_(bias_in), H(last_dim(x_in, kOp)),
        dt(float_dtype(x_in, kOp, "x")), bias_grad(bg) {
    TORCH_CHECK(dy_.sizes() == x_.sizes() && dy_.scalar_type() == x_.scalar_type(),
                "megapre::bias_gelu_bwd: dy must match x in shape and dtype");
    check_same_device(dy_, x_, kOp);
    check_vector(bias_in, H, x_in, kOp, "bias");
  }

  void alloc() {
    dy = dy_.contiguous();
    x = x_.contiguous();
    bias = float_vector(bias_);
    dx = at::empty_like(x);
    dbias = at::empty({bias_grad ? H : 0}, x.options().dtype(at::kFloat));
    if (!launch()) dbias.zero_();
  }
  bool launch() const { return x.numel() > 0; }
  int64_t rows() const { return x.numel() / H; }
  float* dbias_ptr() const { return bias_grad ? dbias.data_ptr<float>() : nullptr; }
  std::tuple<at::Tensor, at::Tensor> outputs() const { return {dx, dbias}; }
};

struct QuantizeRowwise {
  static constexpr const char* kOp = "quantize_rowwise";
  const at::Tensor& x_;
  const DType dt;
  at::Tensor x, q, scale;

  explicit QuantizeRowwise(const at::Tensor& x_in)
      : x_(x_in), dt(float_dtype(x_in, 2, kOp, "x")) {}

  void alloc() {
    x = x_.contiguous();
    q = at::empty(x.sizes(), x.options().dtype(at::kChar));
    scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  }
  // Empty rows (K == 0) still go to the kernel: it writes their scale, 0.
  bool launch() const { return x.size(0) > 0; }
  std::tuple<at::Tensor, at::Tensor> outputs() const { return {q, scale}; }
};

// What the two int8 GEMMs share: x [M, K], w [N, K] int8, w_scale [N], optional bias [N].
struct GemmArgs {
  const at::Tensor &x_, &w_, &ws_;
  const c10::optional<at::Tensor>& bias_;
  const int64_t M, N, K;
  at::Tensor x, w, ws, bias;

  GemmArgs(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& ws_in,
           const c10::optional<at::Tensor>& bias_in, const char* op)
      : x_(x_in), w_(w_in), ws_(ws_in), bias_(bias_in),
        M(rows_2d(x_in, op, "x")), N(rows_2d(w_in, op, "w")), K(x_in.size(1)) {
    check_weights(x_in, w_in, ws_in, op);
    check_vector(bias_in, N, x_in, op, "bias");
  }

  void alloc_inputs() {
    x = x_.contiguous();
    w = w_.contiguous();
    ws = ws_.contiguous();
    bias = float_vector(bias_);
  }
  bool launch() const { return M > 0 && N > 0; }
};

struct Int8Gemm : GemmArgs {
  static constexpr const char* kOp = "int8_gemm";
  const at::Tensor& xs_;
  const at::ScalarType out_type;
  const DType out_dt;
  at::Tensor xs, out;

  Int8Gemm(const at::Tensor& x_in, const at::Tensor& xs_in, const at::Tensor& w_in,
           const at::Tensor& ws_in, const c10::optional<at::Tensor>& bias_in, at::ScalarType ot)
      : GemmArgs(x_in, w_in, ws_in, bias_in, kOp), xs_(xs_in), out_type(ot),
        out_dt(to_dtype(ot, kOp, "out_dtype")) {
    TORCH_CHECK(x_.scalar_type() == at::kChar && w_.scalar_type() == at::kChar, "megapre::", kOp,
                ": x and w must be int8, got ", x_.scalar_type(), " and ", w_.scalar_type());
    TORCH_CHECK(xs_.scalar_type() == at::kFloat && xs_.dim() == 1 && xs_.size(0) == M,
                "megapre::", kOp, ": x_scale must be float32 [", M, "], got ", xs_.scalar_type(),
                " ", xs_.sizes());
    check_same_device(x_, xs_, kOp);
  }

  void alloc() {
    alloc_inputs();
    xs = xs_.contiguous();
    out = at::empty({M, N}, x.options().dtype(out_type));
  }
};

// No output here: the CUDA glue's large-M path gets its output from a GEMM.
struct WeightOnlyGemm : GemmArgs {
  static constexpr const char* kOp = "weight_only_int8_gemm";
  const DType dt;

  WeightOnlyGemm(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& ws_in,
                 const c10::optional<at::Tensor>& bias_in)
      : GemmArgs(x_in, w_in, ws_in, bias_in, kOp), dt(float_dtype(x_in, kOp, "x")) {
    TORCH_CHECK(w_.scalar_type() == at::kChar, "megapre::", kOp, ": w must be int8, got ",
                w_.scalar_type());
  }

  void alloc() { alloc_inputs(); }
  at::Tensor new_out() const { return at::empty({M, N}, x.options()); }
};

}  // namespace megapre::glue
