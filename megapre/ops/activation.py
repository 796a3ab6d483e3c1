"""Fused bias + GELU (tanh approximation): gelu(x + bias) in one pass over memory.

The MLP's first projection runs without its bias and this op adds it on the way into the
activation (Megatron's bias-GELU fusion). Backward recomputes the activation from the saved
pre-activation and returns the bias gradient from the same pass. torch.ops.megapre.bias_gelu_*
do the work; this file gives them autograd and fake (meta) impls, and the public function.
"""
from __future__ import annotations

import torch

from . import _checks, export_mode, reference
from ._loader import STATE, compiled_for


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[:2]
    if dy is None or not (need_x or need_b):
        return None, None
    dx, db = torch.ops.megapre.bias_gelu_bwd(dy, x, bias, bool(need_b))  # need_b: bias given
    return (dx if need_x else None), (db.to(ctx.bias_dtype) if need_b else None)


def _register() -> None:
    @torch.library.register_fake("megapre::bias_gelu_fwd")
    def _(x, bias):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("megapre::bias_gelu_bwd")
    def _(dy, x, bias, bias_grad):
        h = x.shape[-1] if bias_grad else 0
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                x.new_empty((h,), dtype=torch.float32))

    torch.library.register_autograd("megapre::bias_gelu_fwd", _backward,
                                    setup_context=_setup_context)


if STATE.cpu:
    _register()


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(x + bias, approximate='tanh') over the last dim's features, math in float32,
    result in x.dtype. `bias` ([x.shape[-1]], any float dtype) may be None: plain GELU."""
    if export_mode.active():
        return export_mode.bias_gelu(x, bias)
    _checks.floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (the bias is added over the last)")
    _checks.vector("bias", bias, x.shape[-1])
    _checks.same_device(x=x, bias=bias)
    if not compiled_for(x.device):
        return reference.bias_gelu(x, bias)
    if bias is not None and bias.dtype == torch.float64:
        bias = bias.float()  # the kernels take float32/16 biases; autograd converts the grad
    return torch.ops.megapre.bias_gelu_fwd(x, bias)
