// CPU implementations of torch.ops.megapre.*: validate, make contiguous, allocate, call the
// raw-pointer kernels of kernels.h.
#include <torch/library.h>

#include <tuple>

#include "../glue.h"
#include "kernels.h"

namespace megapre {
namespace {

using at::Tensor;
using c10::optional;
namespace g = glue;

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x_, const optional<Tensor>& residual,
                                                    const optional<Tensor>& weight,
                                                    const optional<Tensor>& bias, double eps, bool rms) {
  auto [rows, H] = g::check_norm_input(x_, residual, "norm_fwd");
  DType dt = g::float_dtype(x_, "norm_fwd", "x");
  Tensor x = x_.contiguous();
  Tensor r = residual.has_value() && residual->defined() ? residual->contiguous() : Tensor();
  Tensor gamma = g::float_vector(weight, H, x, "norm_fwd", "weight");
  Tensor beta = g::float_vector(bias, H, x, "norm_fwd", "bias");
  Tensor y = at::empty_like(x);
  Tensor sum = r.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms ? 0 : rows}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (x.numel() > 0) {
    cpu::norm_fwd(x.data_ptr(), g::vptr(r), y.data_ptr(), r.defined() ? sum.data_ptr() : nullptr,
                  g::fptr(gamma), g::fptr(beta), rms ? nullptr : mean.data_ptr<float>(),
                  rstd.data_ptr<float>(), rows, H, static_cast<float>(eps), rms, dt);
  }
  return {y, sum, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy_, const optional<Tensor>& dsum_,
                                            const Tensor& xin_, const optional<Tensor>& weight,
                                            const Tensor& mean, const Tensor& rstd, bool rms,
                                            bool weight_grad, bool bias_grad) {
  auto [rows, H] = g::check_norm_input(xin_, dsum_, "norm_bwd");
  TORCH_CHECK(dy_.sizes() == xin_.sizes() && dy_.scalar_type() == xin_.scalar_type(),
              "megapre::norm_bwd: dy must match xin");
  TORCH_CHECK(rstd.numel() == rows && (rms || mean.numel() == rows),
              "megapre::norm_bwd: mean/rstd must have ", rows, " elements");
  DType dt = g::float_dtype(xin_, "norm_bwd", "xin");
  Tensor dy = dy_.contiguous(), xin = xin_.contiguous();
  Tensor dsum = dsum_.has_value() && dsum_->defined() ? dsum_->contiguous() : Tensor();
  Tensor gamma = g::float_vector(weight, H, xin, "norm_bwd", "weight");
  Tensor mean_c = mean.to(at::kFloat).contiguous(), rstd_c = rstd.to(at::kFloat).contiguous();
  Tensor dx = at::empty_like(xin);
  auto f32 = xin.options().dtype(at::kFloat);
  Tensor dgamma = weight_grad ? at::zeros({H}, f32) : at::empty({0}, f32);
  Tensor dbeta = bias_grad ? at::zeros({H}, f32) : at::empty({0}, f32);
  if (xin.numel() > 0) {
    cpu::norm_bwd(dy.data_ptr(), g::vptr(dsum), xin.data_ptr(), g::fptr(gamma),
                  rms ? nullptr : mean_c.data_ptr<float>(), rstd_c.data_ptr<float>(), dx.data_ptr(),
                  weight_grad ? dgamma.data_ptr<float>() : nullptr,
                  bias_grad ? dbeta.data_ptr<float>() : nullptr, rows, H, rms, dt);
  }
  return {dx, dgamma, dbeta};
}

Tensor softmax_fwd(const Tensor& scores_, const optional<Tensor>& mask_, double scale, bool causal) {
  g::check_dim(scores_, 4, "scale_mask_softmax_fwd", "scores");
  DType dt = g::float_dtype(scores_, "scale_mask_softmax_fwd", "scores");
  Tensor scores = scores_.contiguous();
  Tensor mask = g::expand_mask(mask_, scores, "scale_mask_softmax_fwd");
  Tensor probs = at::empty_like(scores);
  if (scores.numel() == 0) return probs;
  int64_t strides[4] = {0, 0, 0, 0};
  if (mask.defined()) {
    for (int d = 0; d < 4; ++d) strides[d] = mask.size(d) == 1 ? 0 : mask.stride(d);
  }
  cpu::softmax_fwd(scores.data_ptr(), mask.defined() ? mask.data_ptr<bool>() : nullptr, strides,
                   probs.data_ptr(), scores.size(0), scores.size(1), scores.size(2), scores.size(3),
                   static_cast<float>(scale), causal, dt);
  return probs;
}

Tensor softmax_bwd(const Tensor& grad_, const Tensor& probs_, double scale, bool causal) {
  g::check_dim(probs_, 4, "scale_mask_softmax_bwd", "probs");
  TORCH_CHECK(grad_.sizes() == probs_.sizes() && grad_.scalar_type() == probs_.scalar_type(),
              "megapre::scale_mask_softmax_bwd: grad must match probs");
  DType dt = g::float_dtype(probs_, "scale_mask_softmax_bwd", "probs");
  Tensor grad = grad_.contiguous(), probs = probs_.contiguous();
  Tensor dscores = at::empty_like(probs);
  if (probs.numel() == 0) return dscores;
  cpu::softmax_bwd(grad.data_ptr(), probs.data_ptr(), dscores.data_ptr(), probs.size(0),
                   probs.size(1), probs.size(2), probs.size(3), static_cast<float>(scale), causal, dt);
  return dscores;
}

Tensor bias_gelu_fwd(const Tensor& x_, const optional<Tensor>& bias_) {
  const int64_t H = g::last_dim(x_, "bias_gelu_fwd");
  DType dt = g::float_dtype(x_, "bias_gelu_fwd", "x");
  Tensor x = x_.contiguous();
  Tensor bias = g::float_vector(bias_, H, x, "bias_gelu_fwd", "bias");
  Tensor y = at::empty_like(x);
  if (x.numel() > 0) {
    cpu::bias_gelu_fwd(x.data_ptr(), g::fptr(bias), y.data_ptr(), x.numel() / H, H, dt);
  }
  return y;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd(const Tensor& dy_, const Tensor& x_,
                                         const optional<Tensor>& bias_, bool bias_grad) {
  const int64_t H = g::last_dim(x_, "bias_gelu_bwd");
  TORCH_CHECK(dy_.sizes() == x_.sizes() && dy_.scalar_type() == x_.scalar_type(),
              "megapre::bias_gelu_bwd: dy must match x in shape and dtype");
  DType dt = g::float_dtype(x_, "bias_gelu_bwd", "x");
  Tensor dy = dy_.contiguous(), x = x_.contiguous();
  Tensor bias = g::float_vector(bias_, H, x, "bias_gelu_bwd", "bias");
  Tensor dx = at::empty_like(x);
  Tensor dbias = at::zeros({bias_grad ? H : 0}, x.options().dtype(at::kFloat));
  if (x.numel() > 0) {
    cpu::bias_gelu_bwd(dy.data_ptr(), x.data_ptr(), g::fptr(bias), dx.data_ptr(),
                       bias_grad ? dbias.data_ptr<float>() : nullptr, x.numel() / H, H, dt);
  }
  return {dx, dbias};
}

std::tuple<Tensor, Tensor> quantize_rowwise(const Tensor& x_) {
  g::check_dim(x_, 2, "quantize_rowwise", "x");
  DType dt = g::float_dtype(x_, "quantize_rowwise", "x");
  Tensor x = x_.contiguous();
  Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  Tensor scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(0) > 0) {
    cpu::quantize_rowwise(x.data_ptr(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), x.size(0),
                          x.size(1), dt);
  }
  return {q, scale};
}

Tensor int8_gemm(const Tensor& x_, const Tensor& xs_, const Tensor& w_, const Tensor& ws_,
                 const optional<Tensor>& bias_, at::ScalarType out_dtype) {
  g::check_int8_gemm(x_, xs_, w_, ws_, "int8_gemm");
  DType odt = g::out_dtype(out_dtype, "int8_gemm");
  Tensor x = x_.contiguous(), w = w_.contiguous(), xs = xs_.contiguous(), ws = ws_.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  Tensor bias = g::float_vector(bias_, N, x, "int8_gemm", "bias");
  Tensor out = at::empty({M, N}, x.options().dtype(out_dtype));
  // M == 0 still goes to the kernel, which then only checks w for -128, so an empty batch
  // rejects bad weights like any other (and like the reference fallback).
  if (N == 0) return out;
  bool ok = cpu::int8_gemm(x.data_ptr<int8_t>(), xs.data_ptr<float>(), w.data_ptr<int8_t>(),
                           ws.data_ptr<float>(), g::fptr(bias), out.data_ptr(), M, N, K, odt);
  TORCH_CHECK(ok, "megapre::int8_gemm: w contains -128; weights must lie in [-127, 127] "
              "(symmetric quantization, as quantize_per_channel produces)");
  return out;
}

Tensor weight_only_int8_gemm(const Tensor& x_, const Tensor& w_, const Tensor& ws_,
                             const optional<Tensor>& bias_) {
  g::check_weight_only(x_, w_, ws_, "weight_only_int8_gemm");
  DType dt = g::float_dtype(x_, "weight_only_int8_gemm", "x");
  Tensor x = x_.contiguous(), w = w_.contiguous(), ws = ws_.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  Tensor bias = g::float_vector(bias_, N, x, "weight_only_int8_gemm", "bias");
  Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  cpu::weight_only_int8_gemm(x.data_ptr(), w.data_ptr<int8_t>(), ws.data_ptr<float>(),
                             g::fptr(bias), out.data_ptr(), M, N, K, dt);
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
