// CPU implementations of torch.ops.megapre.*: the shared glue (csrc/glue.h) checks the
// arguments and allocates the outputs; this file calls the raw-pointer kernels of kernels.h.
#include <torch/library.h>

#include <tuple>

#include "../glue.h"
#include "kernels.h"

namespace megapre {
namespace {

using at::Tensor;
using c10::optional;
namespace g = glue;

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x, const optional<Tensor>& residual,
                                                    const optional<Tensor>& weight,
                                                    const optional<Tensor>& bias, double eps, bool rms) {
  g::NormFwd op(x, residual, weight, bias, eps, rms);
  op.alloc();
  if (op.launch()) {
    cpu::norm_fwd(op.x.data_ptr(), op.residual_ptr(), op.y.data_ptr(), op.sum_ptr(),
                  g::fptr(op.gamma), g::fptr(op.beta), op.mean_ptr(), op.rstd.data_ptr<float>(),
                  op.rows, op.H, op.eps, rms, op.dt);
  }
  return op.outputs();
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy, const optional<Tensor>& dsum,
                                            const Tensor& xin, const optional<Tensor>& weight,
                                            const Tensor& mean, const Tensor& rstd, bool rms,
                                            bool weight_grad, bool bias_grad) {
  g::NormBwd op(dy, dsum, xin, weight, mean, rstd, rms, weight_grad, bias_grad);
  op.alloc();
  if (op.launch()) {
    cpu::norm_bwd(op.dy.data_ptr(), g::vptr(op.dsum), op.xin.data_ptr(), g::fptr(op.gamma),
                  op.mean_ptr(), op.rstd.data_ptr<float>(), op.dx.data_ptr(), op.dgamma_ptr(),
                  op.dbeta_ptr(), op.rows, op.H, rms, op.dt);
  }
  return op.outputs();
}

Tensor softmax_fwd(const Tensor& scores, const optional<Tensor>& mask, double scale, bool causal) {
  g::SoftmaxFwd op(scores, mask, scale, causal);
  op.alloc();
  if (op.launch()) {
    cpu::softmax_fwd(op.scores.data_ptr(), op.mask_ptr(), op.mask_strides, op.probs.data_ptr(),
                     op.size(0), op.size(1), op.size(2), op.size(3), op.scale, causal, op.dt);
  }
  return op.probs;
}

Tensor softmax_bwd(const Tensor& grad, const Tensor& probs, double scale, bool causal) {
  g::SoftmaxBwd op(grad, probs, scale, causal);
  op.alloc();
  if (op.launch()) {
    cpu::softmax_bwd(op.grad.data_ptr(), op.probs.data_ptr(), op.dscores.data_ptr(), op.size(0),
                     op.size(1), op.size(2), op.size(3), op.scale, causal, op.dt);
  }
  return op.dscores;
}

Tensor bias_gelu_fwd(const Tensor& x, const optional<Tensor>& bias) {
  g::BiasGeluFwd op(x, bias);
  op.alloc();
  if (op.launch()) {
    cpu::bias_gelu_fwd(op.x.data_ptr(), g::fptr(op.bias), op.y.data_ptr(), op.rows(), op.H, op.dt);
  }
  return op.y;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd(const Tensor& dy, const Tensor& x,
                                         const optional<Tensor>& bias, bool bias_grad) {
  g::BiasGeluBwd op(dy, x, bias, bias_grad);
  op.alloc();
  if (op.launch()) {
    cpu::bias_gelu_bwd(op.dy.data_ptr(), op.x.data_ptr(), g::fptr(op.bias), op.dx.data_ptr(),
                       op.dbias_ptr(), op.rows(), op.H, op.dt);
  }
  return op.outputs();
}

std::tuple<Tensor, Tensor> quantize_rowwise(const Tensor& x) {
  g::QuantizeRowwise op(x);
  op.alloc();
  if (op.launch()) {
    cpu::quantize_rowwise(op.x.data_ptr(), op.q.data_ptr<int8_t>(), op.scale.data_ptr<float>(),
                          op.x.size(0), op.x.size(1), op.dt);
  }
  return op.outputs();
}

constexpr const char* kMinus128 =
    "megapre::int8_gemm: w contains -128; weights must lie in [-127, 127] (symmetric "
    "quantization, as quantize_per_channel produces)";

Tensor int8_gemm(const Tensor& x, const Tensor& xs, const Tensor& w, const Tensor& ws,
                 const optional<Tensor>& bias, at::ScalarType out_dtype) {
  g::Int8Gemm op(x, xs, w, ws, bias, out_dtype);
  op.alloc();
  if (!op.launch()) {
    // The CPU kernels cannot take -128 (see kernels.h), so an empty batch rejects such weights
    // too, like any other batch (and like the reference fallback).
    TORCH_CHECK(op.N == 0 || !(op.w == -128).any().item<bool>(), kMinus128);
    return op.out;
  }
  bool ok = cpu::int8_gemm(op.x.data_ptr<int8_t>(), op.xs.data_ptr<float>(),
                           op.w.data_ptr<int8_t>(), op.ws.data_ptr<float>(), g::fptr(op.bias),
                           op.out.data_ptr(), op.M, op.N, op.K, op.out_dt);
  TORCH_CHECK(ok, kMinus128);
  return op.out;
}

Tensor weight_only_int8_gemm(const Tensor& x, const Tensor& w, const Tensor& ws,
                             const optional<Tensor>& bias) {
  g::WeightOnlyGemm op(x, w, ws, bias);
  op.alloc();
  Tensor out = op.new_out();
  if (op.launch()) {
    cpu::weight_only_int8_gemm(op.x.data_ptr(), op.w.data_ptr<int8_t>(), op.ws.data_ptr<float>(),
                               g::fptr(op.bias), out.data_ptr(), op.M, op.N, op.K, op.dt);
  }
  return out;
}

}  // namespace
}  // namespace megapre

TORCH_LIBRARY_IMPL(megapre, CPU, m) {
  m.impl("norm_fwd", &megapre::norm_fwd);
  m.impl("norm_bwd", &megapre::norm_bwd);
  m.impl("scale_mask_softmax_fwd", &megapre::softmax_fwd);
  m.impl("scale_mask_softmax_bwd", &megapre::softmax_bwd);
  m.impl("bias_gelu_fwd", &megapre::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &megapre::bias_gelu_bwd);
  m.impl("quantize_rowwise", &megapre::quantize_rowwise);
  m.impl("int8_gemm", &megapre::int8_gemm);
  m.impl("weight_only_int8_gemm", &megapre::weight_only_int8_gemm);
}
