"""Int8 quantization and GEMMs: W8A8 (dynamic per-token activations x per-channel weights, int32
accumulate, dequant + bias fused into the output) and weight-only int8 (the generation case).
Forward only: these serve inference, quantization-aware evaluation and distillation teachers.
"""
from __future__ import annotations

import math

import torch

from . import _checks, reference
from ._loader import STATE, compiled_for


def _register() -> None:
    @torch.library.register_fake("megapre::quantize_rowwise")
    def _(x):
        return torch.empty_like(x, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("megapre::int8_gemm")
    def _(x, x_scale, w, w_scale, bias, out_dtype):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("megapre::weight_only_int8_gemm")
    def _(x, w, w_scale, bias):
        return x.new_empty((x.shape[0], w.shape[0]))


if STATE.cpu:
    _register()


def _rows(x: torch.Tensor) -> torch.Tensor:
    # An explicit row count: reshape(-1, 0) is ambiguous and raises for K == 0.
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def quantize_per_token(x):
    """x [..., K] float -> (int8 [..., K], float32 scale [...]): symmetric absmax per row."""
    _checks.floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim")
    if not compiled_for(x.device):
        return reference.quantize_per_token(x)
    q, s = torch.ops.megapre.quantize_rowwise(_rows(x))
    return q.view(x.shape), s.view(x.shape[:-1])


def quantize_per_channel(w):
    """Weights [N, K] -> (int8 [N, K], float32 scale [N]): one scale per output channel."""
    _checks.floating("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {list(w.shape)}")
    return quantize_per_token(w)


def _check_weights(w_int8, w_scale, k: int, bias) -> None:
    _checks.int8("w_int8", w_int8)
    if w_int8.dim() != 2:
        raise ValueError(f"w_int8 must be 2-D [N, K], got shape {list(w_int8.shape)}")
    if w_int8.shape[1] != k:
        raise ValueError(f"K mismatch: input has K={k} but w_int8 is {list(w_int8.shape)} ([N, K])")
    _checks.scale_vector("w_scale", w_scale, (w_int8.shape[0],))
    _checks.vector("bias", bias, w_int8.shape[0])


def int8_gemm(x_int8, x_scale, w_int8, w_scale, bias=None, out_dtype=torch.float32):
    """out[..., n] = (sum_k x_int8[..., k] * w_int8[n, k]) * x_scale[...] * w_scale[n] + bias[n],
    exact int32 accumulation, output in out_dtype (float32/float16/bfloat16)."""
    _checks.int8("x_int8", x_int8)
    if x_int8.dim() == 0:
        raise ValueError("x_int8 must have at least 1 dim")
    _check_weights(w_int8, w_scale, x_int8.shape[-1], bias)
    _checks.scale_vector("x_scale", x_scale, x_int8.shape[:-1])
    if out_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    _checks.same_device(x_int8=x_int8, x_scale=x_scale, w_int8=w_int8, w_scale=w_scale, bias=bias)
    if not compiled_for(x_int8.device):
        if bool((w_int8 == -128).any()):
            raise ValueError("w_int8 contains -128; weights must lie in [-127, 127] (symmetric "
                             "quantization, as quantize_per_channel produces)")
        return reference.int8_gemm(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)
    out = _int8_gemm_op(_rows(x_int8), x_scale.reshape(-1), w_int8, w_scale, bias, out_dtype)
    return out.view(*x_int8.shape[:-1], w_int8.shape[0])


def _int8_gemm_op(x2, xs1, w_int8, w_scale, bias, out_dtype):
    """The compiled GEMM on validated 2-D x / 1-D scales; a -128 weight becomes ValueError."""
    try:
        return torch.ops.megapre.int8_gemm(x2, xs1, w_int8, w_scale, bias, out_dtype)
    except RuntimeError as e:
        if "-128" in str(e):
            raise ValueError(str(e).splitlines()[0]) from None
        raise


def int8_linear(x, w_int8, w_scale, bias=None):
    """W8A8 linear: quantize x per token on the fly, int8 GEMM, dequantize into x's dtype."""
    _checks.floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim")
    _check_weights(w_int8, w_scale, x.shape[-1], bias)
    _checks.same_device(x=x, w_int8=w_int8, w_scale=w_scale, bias=bias)
    if not compiled_for(x.device):
        xq, xs = reference.quantize_per_token(x)
        return int8_gemm(xq, xs, w_int8, w_scale, bias, out_dtype=x.dtype)
    # Inputs are validated once here: the two compiled ops run back to back, so the Python
    # cost stays small next to a small GEMM (it is a few percent at M=512, K=N=1024).
    xq, xs = torch.ops.megapre.quantize_rowwise(_rows(x))
    out = _int8_gemm_op(xq, xs, w_int8, w_scale, bias, x.dtype)
    return out.view(*x.shape[:-1], w_int8.shape[0])


def weight_only_int8_linear(x, w_int8, w_scale, bias=None):
    """x @ (w_int8 * w_scale[:, None]).T + bias with float32 accumulation, output in x's dtype.
    Reads 1 byte per weight: the win is memory traffic, largest for small batches (decode)."""
    _checks.floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim")
    _check_weights(w_int8, w_scale, x.shape[-1], bias)
    _checks.same_device(x=x, w_int8=w_int8, w_scale=w_scale, bias=bias)
    if not compiled_for(x.device):
        return reference.weight_only_int8_linear(x, w_int8, w_scale, bias)
    out = torch.ops.megapre.weight_only_int8_gemm(_rows(x), w_int8, w_scale, bias)
    return out.view(*x.shape[:-1], w_int8.shape[0])
