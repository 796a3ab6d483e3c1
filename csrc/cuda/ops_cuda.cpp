// CUDA implementations of the megapre op schemas (defined with TORCH_LIBRARY in csrc/ops.cpp).
// Validates arguments, makes inputs contiguous, allocates outputs and calls the raw-pointer
// kernels of csrc/cuda/kernels.h on the current stream of the input's device. Kernel failures
// (std::runtime_error from the launch checks) become c10::Error, i.e. Python RuntimeError.
#include <ATen/ATen.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE/cuSOLVER headers
// that a minimal CUDA toolkit lacks).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <tuple>

#include "../glue.h"
#include "kernels.h"

namespace megapre::cuda {
namespace {

using at::Tensor;
using c10::optional;
namespace g = glue;

// Runs a kernel call, turning launch errors (std::runtime_error) into c10::Error.
template <typename F> void run(const char* op, F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "megapre::", op, ": ", e.what());
  }
}

// Current stream of the current device (set by the CUDAGuard each op opens first).
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_cuda_tensor(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "megapre::", op, ": ", name, " must be a CUDA tensor, got ",
              t.device());
}

void check_fits_int(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int32_t>::max(), "megapre::", op, ": ", what, " = ", v,
              " is too large for the CUDA kernels");
}

bool aligned16(const Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0;
}

// ---- norms ------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_op(const Tensor& x_,
                                                    const optional<Tensor>& residual,
                                                    const optional<Tensor>& weight,
                                                    const optional<Tensor>& bias, double eps,
                                                    bool rms) {
  auto [rows, H] = g::check_norm_input(x_, residual, "norm_fwd");
  check_cuda_tensor(x_, "norm_fwd", "x");
  check_fits_int(H, "norm_fwd", "H");
  const DType dt = g::float_dtype(x_, "norm_fwd", "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = x_.contiguous();
  Tensor r = residual.has_value() && residual->defined() ? residual->contiguous() : Tensor();
  Tensor gamma = g::float_vector(weight, H, x, "norm_fwd", "weight");
  Tensor beta = g::float_vector(bias, H, x, "norm_fwd", "bias");
  auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor sum = r.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms ? 0 : rows}, f32);
  Tensor rstd = at::empty({rows}, f32);
  if (rows > 0 && H == 0) {  // statistics of an empty row: 0 / 0
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  if (x.numel() > 0) {
    run("norm_fwd", [&] {
      cuda::norm_fwd(x.data_ptr(), g::vptr(r), y.data_ptr(), r.defined() ? sum.data_ptr() : nullptr,
                     g::fptr(gamma), rms ? nullptr : g::fptr(beta),
                     rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, H,
                     static_cast<float>(eps), rms, dt, stream());
    });
  }
  return {y, sum, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_op(const Tensor& dy_, const optional<Tensor>& dsum_,
                                            const Tensor& xin_, const optional<Tensor>& weight,
                                            const Tensor& mean, const Tensor& rstd, bool rms,
                                            bool weight_grad, bool bias_grad) {
  auto [rows, H] = g::check_norm_input(xin_, dsum_, "norm_bwd");
  TORCH_CHECK(dy_.sizes() == xin_.sizes() && dy_.scalar_type() == xin_.scalar_type(),
              "megapre::norm_bwd: dy must match xin");
  TORCH_CHECK(rstd.numel() == rows && (rms || mean.numel() == rows),
              "megapre::norm_bwd: mean/rstd must have ", rows, " elements");
  check_cuda_tensor(xin_, "norm_bwd", "xin");
  g::check_same_device(dy_, xin_, "norm_bwd");
  g::check_same_device(rstd, xin_, "norm_bwd");
  if (!rms) g::check_same_device(mean, xin_, "norm_bwd");
  check_fits_int(H, "norm_bwd", "H");
  const DType dt = g::float_dtype(xin_, "norm_bwd", "xin");
  const c10::cuda::CUDAGuard guard(xin_.device());
  Tensor dy = dy_.contiguous(), xin = xin_.contiguous();
  Tensor dsum = dsum_.has_value() && dsum_->defined() ? dsum_->contiguous() : Tensor();
  Tensor gamma = g::float_vector(weight, H, xin, "norm_bwd", "weight");
  Tensor mean_c = rms ? Tensor() : mean.to(at::kFloat).contiguous();
  Tensor rstd_c = rstd.to(at::kFloat).contiguous();
  auto f32 = xin.options().dtype(at::kFloat);
  Tensor dx = at::empty_like(xin);
  Tensor dgamma = at::empty({weight_grad ? H : 0}, f32);
  Tensor dbeta = at::empty({bias_grad ? H : 0}, f32);
  if (xin.numel() == 0) {  // no rows (or empty rows): parameter gradients are zero
    dgamma.zero_();
    dbeta.zero_();
    return {dx, dgamma, dbeta};
  }
  Tensor ws;
  if (weight_grad || bias_grad) ws = at::empty({cuda::norm_bwd_workspace_floats(rows, H)}, f32);
  run("norm_bwd", [&] {
    cuda::norm_bwd(dy.data_ptr(), g::vptr(dsum), xin.data_ptr(), g::fptr(gamma),
                   rms ? nullptr : mean_c.data_ptr<float>(), rstd_c.data_ptr<float>(),
                   dx.data_ptr(), weight_grad ? dgamma.data_ptr<float>() : nullptr,
                   bias_grad ? dbeta.data_ptr<float>() : nullptr,
                   ws.defined() ? ws.data_ptr<float>() : nullptr, rows, H, rms, dt,
                   stream());
  });
  return {dx, dgamma, dbeta};
}

// ---- softmax ----------------------------------------------------------------------------------

Tensor softmax_fwd_op(const Tensor& scores_, const optional<Tensor>& mask_, double scale,
                   bool causal) {
  g::check_dim(scores_, 4, "scale_mask_softmax_fwd", "scores");
  check_cuda_tensor(scores_, "scale_mask_softmax_fwd", "scores");
  const DType dt = g::float_dtype(scores_, "scale_mask_softmax_fwd", "scores");
  for (int d = 1; d < 4; ++d) check_fits_int(scores_.size(d), "scale_mask_softmax_fwd", "dim");
  const c10::cuda::CUDAGuard guard(scores_.device());
  Tensor scores = scores_.contiguous();
  Tensor mask = g::expand_mask(mask_, scores, "scale_mask_softmax_fwd");
  Tensor probs = at::empty_like(scores);
  if (scores.numel() == 0) return probs;
  int64_t strides[4] = {0, 0, 0, 0};
  if (mask.defined()) {
    for (int d = 0; d < 4; ++d) strides[d] = mask.size(d) == 1 ? 0 : mask.stride(d);
  }
  run("scale_mask_softmax_fwd", [&] {
    cuda::softmax_fwd(scores.data_ptr(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
                      strides, probs.data_ptr(), scores.size(0), scores.size(1), scores.size(2),
                      scores.size(3), static_cast<float>(scale), causal, dt, stream());
  });
  return probs;
}

Tensor softmax_bwd_op(const Tensor& grad_, const Tensor& probs_, double scale, bool causal) {
  g::check_dim(probs_, 4, "scale_mask_softmax_bwd", "probs");
  TORCH_CHECK(grad_.sizes() == probs_.sizes() && grad_.scalar_type() == probs_.scalar_type(),
              "megapre::scale_mask_softmax_bwd: grad must match probs");
  check_cuda_tensor(probs_, "scale_mask_softmax_bwd", "probs");
  g::check_same_device(grad_, probs_, "scale_mask_softmax_bwd");
  const DType dt = g::float_dtype(probs_, "scale_mask_softmax_bwd", "probs");
  for (int d = 1; d < 4; ++d) check_fits_int(probs_.size(d), "scale_mask_softmax_bwd", "dim");
  const c10::cuda::CUDAGuard guard(probs_.device());
  Tensor grad = grad_.contiguous(), probs = probs_.contiguous();
  Tensor dscores = at::empty_like(probs);
  if (probs.numel() == 0) return dscores;
  run("scale_mask_softmax_bwd", [&] {
    cuda::softmax_bwd(grad.data_ptr(), probs.data_ptr(), dscores.data_ptr(), probs.size(0),
                      probs.size(1), probs.size(2), probs.size(3), static_cast<float>(scale),
                      causal, dt, stream());
  });
  return dscores;
}

// ---- int8 -------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> quantize_rowwise_op(const Tensor& x_) {
  g::check_dim(x_, 2, "quantize_rowwise", "x");
  check_cuda_tensor(x_, "quantize_rowwise", "x");
  const DType dt = g::float_dtype(x_, "quantize_rowwise", "x");
  check_fits_int(x_.size(1), "quantize_rowwise", "K");
  const c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = x_.contiguous();
  Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  Tensor scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(0) > 0) {
    run("quantize_rowwise", [&] {
      cuda::quantize_rowwise(x.data_ptr(), q.data_ptr<int8_t>(), scale.data_ptr<float>(),
                             x.size(0), x.size(1), dt, stream());
    });
  }
  return {q, scale};
}

// torch._int_mm (cuBLASLt int8 on tensor cores) accepts, in torch 2.x _int_mm_out_cuda:
// M > 16, K > 0 and K % 8 == 0, N > 0 and N % 8 == 0. x [M, K] row-major times w.t()
// (column-major [K, N]) is its TN layout.
bool int_mm_applies(const Tensor& x, const Tensor& w, int64_t M, int64_t N, int64_t K) {
  return M > 16 && K > 0 && K % 8 == 0 && N % 8 == 0 && aligned16(x) && aligned16(w);
}

Tensor int8_gemm_op(const Tensor& x_, const Tensor& xs_, const Tensor& w_, const Tensor& ws_,
                 const optional<Tensor>& bias_, at::ScalarType out_dtype) {
  g::check_int8_gemm(x_, xs_, w_, ws_, "int8_gemm");
  check_cuda_tensor(x_, "int8_gemm", "x");
  const DType odt = g::out_dtype(out_dtype, "int8_gemm");
  check_fits_int(w_.size(0), "int8_gemm", "N");
  check_fits_int(x_.size(1), "int8_gemm", "K");
  const c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = x_.contiguous(), w = w_.contiguous(), xs = xs_.contiguous(), ws = ws_.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  Tensor bias = g::float_vector(bias_, N, x, "int8_gemm", "bias");
  Tensor out = at::empty({M, N}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  if (int_mm_applies(x, w, M, N, K)) {
    Tensor acc = at::_int_mm(x, w.t());
    run("int8_gemm", [&] {
      cuda::int8_dequant_epilogue(acc.data_ptr<int32_t>(), xs.data_ptr<float>(),
                                  ws.data_ptr<float>(), g::fptr(bias), out.data_ptr(), M, N, odt,
                                  stream());
    });
  } else {
    run("int8_gemm", [&] {
      cuda::int8_gemm_simt(x.data_ptr<int8_t>(), xs.data_ptr<float>(), w.data_ptr<int8_t>(),
                           ws.data_ptr<float>(), g::fptr(bias), out.data_ptr(), M, N, K, odt,
                           stream());
    });
  }
  return out;
}

Tensor weight_only_int8_gemm_op(const Tensor& x_, const Tensor& w_, const Tensor& ws_,
                             const optional<Tensor>& bias_) {
  g::check_weight_only(x_, w_, ws_, "weight_only_int8_gemm");
  check_cuda_tensor(x_, "weight_only_int8_gemm", "x");
  const DType dt = g::float_dtype(x_, "weight_only_int8_gemm", "x");
  check_fits_int(w_.size(0), "weight_only_int8_gemm", "N");
  check_fits_int(x_.size(1), "weight_only_int8_gemm", "K");
  const c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = x_.contiguous(), w = w_.contiguous(), ws = ws_.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  Tensor bias = g::float_vector(bias_, N, x, "weight_only_int8_gemm", "bias");
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  if (M <= 16) {  // generation: a single pass over the int8 weights
    Tensor out = at::empty({M, N}, x.options());
    run("weight_only_int8_gemm", [&] {
      cuda::weight_only_int8_gemv(x.data_ptr(), w.data_ptr<int8_t>(), ws.data_ptr<float>(),
                                  g::fptr(bias), out.data_ptr(), M, N, K, dt, stream());
    });
    return out;
  }
  // Larger M: dequantize the weights to x's dtype once, then a tensor-core GEMM.
  Tensor wd = at::empty({N, K}, x.options());
  run("weight_only_int8_gemm", [&] {
    cuda::dequantize_rowwise(w.data_ptr<int8_t>(), ws.data_ptr<float>(), wd.data_ptr(), N, K, dt,
                             stream());
  });
  if (bias.defined()) return at::addmm(bias.to(x.scalar_type()), x, wd.t());
  return at::mm(x, wd.t());
}

// ---- bias + GELU ------------------------------------------------------------------------------

Tensor bias_gelu_fwd_op(const Tensor& x_, const optional<Tensor>& bias_) {
  const int64_t H = g::last_dim(x_, "bias_gelu_fwd");
  check_cuda_tensor(x_, "bias_gelu_fwd", "x");
  const DType dt = g::float_dtype(x_, "bias_gelu_fwd", "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = x_.contiguous();
  Tensor bias = g::float_vector(bias_, H, x, "bias_gelu_fwd", "bias");
  Tensor y = at::empty_like(x);
  if (x.numel() > 0) {
    run("bias_gelu_fwd", [&] {
      cuda::bias_gelu_fwd(x.data_ptr(), g::fptr(bias), y.data_ptr(), x.numel() / H, H, dt,
                          stream());
    });
  }
  return y;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_op(const Tensor& dy_, const Tensor& x_,
                                            const optional<Tensor>& bias_, bool bias_grad) {
  const int64_t H = g::last_dim(x_, "bias_gelu_bwd");
  check_cuda_tensor(x_, "bias_gelu_bwd", "x");
  TORCH_CHECK(dy_.sizes() == x_.sizes() && dy_.scalar_type() == x_.scalar_type(),
              "megapre::bias_gelu_bwd: dy must match x in shape and dtype");
  g::check_same_device(dy_, x_, "bias_gelu_bwd");
  const DType dt = g::float_dtype(x_, "bias_gelu_bwd", "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  Tensor dy = dy_.contiguous(), x = x_.contiguous();
  Tensor bias = g::float_vector(bias_, H, x, "bias_gelu_bwd", "bias");
  Tensor dx = at::empty_like(x);
  if (x.numel() > 0) {
    run("bias_gelu_bwd", [&] {
      cuda::bias_gelu_bwd(dy.data_ptr(), x.data_ptr(), g::fptr(bias), dx.data_ptr(),
                          x.numel() / H, H, dt, stream());
    });
  }
  auto f32 = x.options().dtype(at::kFloat);
  if (!bias_grad) return {dx, at::empty({0}, f32)};
  if (x.numel() == 0) return {dx, at::zeros({H}, f32)};
  // column sums of dx as stored, accumulated in float32 (as the CPU kernel)
  return {dx, dx.reshape({-1, H}).sum(0, false, at::kFloat)};
}

}  // namespace
}  // namespace megapre::cuda

TORCH_LIBRARY_IMPL(megapre, CUDA, m) {
  namespace mc = megapre::cuda;
  m.impl("norm_fwd", &mc::norm_fwd_op);
  m.impl("norm_bwd", &mc::norm_bwd_op);
  m.impl("scale_mask_softmax_fwd", &mc::softmax_fwd_op);
  m.impl("scale_mask_softmax_bwd", &mc::softmax_bwd_op);
  m.impl("bias_gelu_fwd", &mc::bias_gelu_fwd_op);
  m.impl("bias_gelu_bwd", &mc::bias_gelu_bwd_op);
  m.impl("quantize_rowwise", &mc::quantize_rowwise_op);
  m.impl("int8_gemm", &mc::int8_gemm_op);
  m.impl("weight_only_int8_gemm", &mc::weight_only_int8_gemm_op);
}
