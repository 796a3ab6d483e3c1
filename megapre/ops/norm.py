"""Fused LayerNorm / RMSNorm (optionally with the residual add of pre-LN blocks folded in).

torch.ops.megapre.norm_fwd/norm_bwd do the work; this file gives them autograd and fake
(meta) impls so they run in eager mode and under torch.compile, and the public functions.
"""
from __future__ import annotations

import torch

from . import _checks, export_mode, reference
from ._loader import STATE, compiled_for


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, rms = inputs
    y, s, mean, rstd = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.rms = rms
    ctx.has_residual = residual is not None
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)


def _backward(ctx, dy, dsum, _dmean, _drstd):
    xin, weight, mean, rstd = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    if dy is None:  # only the sum output was used: it passes its gradient straight through
        dx = dsum
        dw = torch.zeros_like(weight) if need_w else None
        db = torch.zeros(xin.shape[-1], dtype=ctx.bias_dtype, device=xin.device) if need_b else None
    else:
        dsum = dsum if ctx.has_residual else None
        dx, dw, db = torch.ops.megapre.norm_bwd(
            dy, dsum, xin, weight, mean, rstd, ctx.rms, bool(need_w), bool(need_b)
        )
        dw = dw.to(ctx.weight_dtype) if need_w else None
        db = db.to(ctx.bias_dtype) if need_b else None
    return (dx if need_x else None), (dx if need_r else None), dw, db, None, None


def _register() -> None:
    @torch.library.register_fake("megapre::norm_fwd")
    def _(x, residual, weight, bias, eps, rms):
        f32 = dict(dtype=torch.float32, device=x.device)
        s = torch.empty_like(x) if residual is not None else x.new_empty((0,))
        mean = x.new_empty((0 if rms else x.shape[0],), **f32)
        return torch.empty_like(x), s, mean, x.new_empty((x.shape[0],), **f32)

    @torch.library.register_fake("megapre::norm_bwd")
    def _(dy, dsum, xin, weight, mean, rstd, rms, weight_grad, bias_grad):
        f32 = dict(dtype=torch.float32, device=xin.device)
        h = xin.shape[1]
        return (torch.empty_like(xin), xin.new_empty((h if weight_grad else 0,), **f32),
                xin.new_empty((h if bias_grad else 0,), **f32))

    torch.library.register_autograd("megapre::norm_fwd", _backward, setup_context=_setup_context)


if STATE.cpu:
    _register()


def _check(x, weight, bias, residual) -> None:
    _checks.floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (normalized over the last)")
    h = x.shape[-1]
    _checks.vector("weight", weight, h)
    _checks.vector("bias", bias, h)
    if residual is not None:
        _checks.floating("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x: shape {list(x.shape)} dtype {x.dtype}; got "
                             f"{list(residual.shape)} {residual.dtype}")
    _checks.same_device(x=x, weight=weight, bias=bias, residual=residual)


def _norm(x, weight, bias, eps, residual, rms):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    r2 = residual.reshape(-1, shape[-1]) if residual is not None else None
    y, s, _, _ = torch.ops.megapre.norm_fwd(x2, r2, weight, bias, float(eps), rms)
    y = y.view(shape)
    return y if residual is None else (y, s.view(shape))


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dim of x. With `residual`, computes s = x + residual once and
    returns (layer_norm(s), s): the pre-LN block pattern in one pass over memory."""
    if export_mode.active():
        return export_mode.layer_norm(x, weight, bias, eps, residual)
    _check(x, weight, bias, residual)
    if not compiled_for(x.device):
        return reference.layer_norm(x, weight, bias, eps, residual)
    return _norm(x, weight, bias, eps, residual, rms=False)


def rms_norm(x, weight=None, eps: float = 1e-6, residual=None):
    """RMSNorm over the last dim of x; with `residual` returns (rms_norm(x + residual), x + residual)."""
    if export_mode.active():
        return export_mode.rms_norm(x, weight, eps, residual)
    _check(x, weight, None, residual)
    if not compiled_for(x.device):
        return reference.rms_norm(x, weight, eps, residual)
    return _norm(x, weight, None, eps, residual, rms=True)
