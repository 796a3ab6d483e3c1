// CUDA implementations of the megapre op schemas (defined with TORCH_LIBRARY in csrc/ops.cpp).
// The shared glue (csrc/glue.h) checks the arguments and allocates the outputs; this file adds
// the CUDA-only checks and the device guard, and calls the raw-pointer kernels of
// csrc/cuda/kernels.h on the current stream of the input's device. Kernel failures
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

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_op(const Tensor& x,
                                                    const optional<Tensor>& residual,
                                                    const optional<Tensor>& weight,
                                                    const optional<Tensor>& bias, double eps,
                                                    bool rms) {
  g::NormFwd op(x, residual, weight, bias, eps, rms);
  check_cuda_tensor(x, op.kOp, "x");
  check_fits_int(op.H, op.kOp, "H");
  const c10::cuda::CUDAGuard guard(x.device());
  op.alloc();
  if (op.launch()) {
    run(op.kOp, [&] {
      cuda::norm_fwd(op.x.data_ptr(), op.residual_ptr(), op.y.data_ptr(), op.sum_ptr(),
                     g::fptr(op.gamma), g::fptr(op.beta), op.mean_ptr(),
                     op.rstd.data_ptr<float>(), op.rows, op.H, op.eps, rms, op.dt, stream());
    });
  }
  return op.outputs();
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_op(const Tensor& dy, const optional<Tensor>& dsum,
                                            const Tensor& xin, const optional<Tensor>& weight,
                                            const Tensor& mean, const Tensor& rstd, bool rms,
                                            bool weight_grad, bool bias_grad) {
  g::NormBwd op(dy, dsum, xin, weight, mean, rstd, rms, weight_grad, bias_grad);
  check_cuda_tensor(xin, op.kOp, "xin");
  check_fits_int(op.H, op.kOp, "H");
  const c10::cuda::CUDAGuard guard(xin.device());
  op.alloc();
  if (!op.launch()) return op.outputs();
  Tensor ws;  // partial column sums for dgamma / dbeta
  if (weight_grad || bias_grad) {
    ws = at::empty({cuda::norm_bwd_workspace_floats(op.rows, op.H)},
                   op.xin.options().dtype(at::kFloat));
  }
  run(op.kOp, [&] {
    cuda::norm_bwd(op.dy.data_ptr(), g::vptr(op.dsum), op.xin.data_ptr(), g::fptr(op.gamma),
                   op.mean_ptr(), op.rstd.data_ptr<float>(), op.dx.data_ptr(), op.dgamma_ptr(),
                   op.dbeta_ptr(), ws.defined() ? ws.data_ptr<float>() : nullptr, op.rows, op.H,
                   rms, op.dt, stream());
  });
  return op.outputs();
}

// ---- softmax ----------------------------------------------------------------------------------

Tensor softmax_fwd_op(const Tensor& scores, const optional<Tensor>& mask, double scale,
                      bool causal) {
  g::SoftmaxFwd op(scores, mask, scale, causal);
  check_cuda_tensor(scores, op.kOp, "scores");
  for (int d = 1; d < 4; ++d) check_fits_int(scores.size(d), op.kOp, "dim");
  const c10::cuda::CUDAGuard guard(scores.device());
  op.alloc();
  if (op.launch()) {
    run(op.kOp, [&] {
      cuda::softmax_fwd(op.scores.data_ptr(), op.mask_ptr(), op.mask_strides, op.probs.data_ptr(),
                        op.size(0), op.size(1), op.size(2), op.size(3), op.scale, causal, op.dt,
                        stream());
    });
  }
  return op.probs;
}

Tensor softmax_bwd_op(const Tensor& grad, const Tensor& probs, double scale, bool causal) {
  g::SoftmaxBwd op(grad, probs, scale, causal);
  check_cuda_tensor(probs, op.kOp, "probs");
  for (int d = 1; d < 4; ++d) check_fits_int(probs.size(d), op.kOp, "dim");
  const c10::cuda::CUDAGuard guard(probs.device());
  op.alloc();
  if (op.launch()) {
    run(op.kOp, [&] {
      cuda::softmax_bwd(op.grad.data_ptr(), op.probs.data_ptr(), op.dscores.data_ptr(),
                        op.size(0), op.size(1), op.size(2), op.size(3), op.scale, causal, op.dt,
                        stream());
    });
  }
  return op.dscores;
}

// ---- int8 -------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> quantize_rowwise_op(const Tensor& x) {
  g::QuantizeRowwise op(x);
  check_cuda_tensor(x, op.kOp, "x");
  check_fits_int(x.size(1), op.kOp, "K");
  const c10::cuda::CUDAGuard guard(x.device());
  op.alloc();
  if (op.launch()) {
    run(op.kOp, [&] {
      cuda::quantize_rowwise(op.x.data_ptr(), op.q.data_ptr<int8_t>(), op.scale.data_ptr<float>(),
                             op.x.size(0), op.x.size(1), op.dt, stream());
    });
  }
  return op.outputs();
}

// torch._int_mm (cuBLASLt int8 on tensor cores) accepts, in torch 2.x _int_mm_out_cuda:
// M > 16, K > 0 and K % 8 == 0, N > 0 and N % 8 == 0. x [M, K] row-major times w.t()
// (column-major [K, N]) is its TN layout.
bool int_mm_applies(const Tensor& x, const Tensor& w, int64_t M, int64_t N, int64_t K) {
  return M > 16 && K > 0 && K % 8 == 0 && N % 8 == 0 && aligned16(x) && aligned16(w);
}

Tensor int8_gemm_op(const Tensor& x, const Tensor& xs, const Tensor& w, const Tensor& ws,
                    const optional<Tensor>& bias, at::ScalarType out_dtype) {
  g::Int8Gemm op(x, xs, w, ws, bias, out_dtype);
  check_cuda_tensor(x, op.kOp, "x");
  check_fits_int(op.N, op.kOp, "N");
  check_fits_int(op.K, op.kOp, "K");
  const c10::cuda::CUDAGuard guard(x.device());
  op.alloc();
  if (!op.launch()) return op.out;
  if (int_mm_applies(op.x, op.w, op.M, op.N, op.K)) {
    Tensor acc = at::_int_mm(op.x, op.w.t());
    run(op.kOp, [&] {
      cuda::int8_dequant_epilogue(acc.data_ptr<int32_t>(), op.xs.data_ptr<float>(),
                                  op.ws.data_ptr<float>(), g::fptr(op.bias), op.out.data_ptr(),
                                  op.M, op.N, op.out_dt, stream());
    });
  } else {
    run(op.kOp, [&] {
      cuda::int8_gemm_simt(op.x.data_ptr<int8_t>(), op.xs.data_ptr<float>(),
                           op.w.data_ptr<int8_t>(), op.ws.data_ptr<float>(), g::fptr(op.bias),
                           op.out.data_ptr(), op.M, op.N, op.K, op.out_dt, stream());
    });
  }
  return op.out;
}

Tensor weight_only_int8_gemm_op(const Tensor& x, const Tensor& w, const Tensor& ws,
                                const optional<Tensor>& bias) {
  g::WeightOnlyGemm op(x, w, ws, bias);
  check_cuda_tensor(x, op.kOp, "x");
  check_fits_int(op.N, op.kOp, "N");
  check_fits_int(op.K, op.kOp, "K");
  const c10::cuda::CUDAGuard guard(x.device());
  op.alloc();
  if (!op.launch()) return op.new_out();
  if (op.M <= 16) {  // generation: a single pass over the int8 weights
    Tensor out = op.new_out();
    run(op.kOp, [&] {
      cuda::weight_only_int8_gemv(op.x.data_ptr(), op.w.data_ptr<int8_t>(),
                                  op.ws.data_ptr<float>(), g::fptr(op.bias), out.data_ptr(), op.M,
                                  op.N, op.K, op.dt, stream());
    });
    return out;
  }
  // Larger M: dequantize the weights to x's dtype once, then a tensor-core GEMM.
  Tensor wd = at::empty({op.N, op.K}, op.x.options());
  run(op.kOp, [&] {
    cuda::dequantize_rowwise(op.w.data_ptr<int8_t>(), op.ws.data_ptr<float>(), wd.data_ptr(),
                             op.N, op.K, op.dt, stream());
  });
  if (op.bias.defined()) return at::addmm(op.bias.to(op.x.scalar_type()), op.x, wd.t());
  return at::mm(op.x, wd.t());
}

// ---- bias + GELU ------------------------------------------------------------------------------

Tensor bias_gelu_fwd_op(const Tensor& x, const optional<Tensor>& bias) {
  g::BiasGeluFwd op(x, bias);
  check_cuda_tensor(x, op.kOp, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  op.alloc();
  if (op.launch()) {
    run(op.kOp, [&] {
      cuda::bias_gelu_fwd(op.x.data_ptr(), g::fptr(op.bias), op.y.data_ptr(), op.rows(), op.H,
                          op.dt, stream());
    });
  }
  return op.y;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_op(const Tensor& dy, const Tensor& x,
                                            const optional<Tensor>& bias, bool bias_grad) {
  g::BiasGeluBwd op(dy, x, bias, bias_grad);
  check_cuda_tensor(x, op.kOp, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  op.alloc();
  if (!op.launch()) return op.outputs();
  run(op.kOp, [&] {
    cuda::bias_gelu_bwd(op.dy.data_ptr(), op.x.data_ptr(), g::fptr(op.bias), op.dx.data_ptr(),
                        op.rows(), op.H, op.dt, stream());
  });
  // column sums of dx as stored, accumulated in float32 (as the CPU kernel)
  if (bias_grad) at::sum_out(op.dbias, op.dx.reshape({-1, op.H}), {0}, false, at::kFloat);
  return op.outputs();
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
