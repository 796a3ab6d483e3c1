"""Fused scale + mask + softmax for attention scores [b, heads, sq, sk].

One kernel replaces scale, masked_fill, softmax (and their three backward passes); causal
rows only touch their visible prefix. Autograd and fake impls are registered here.
"""
from __future__ import annotations

import torch

from . import _checks, export_mode, reference
from ._loader import STATE, compiled_for


def _setup_context(ctx, inputs, output):
    _scores, _mask, scale, causal = inputs
    ctx.scale, ctx.causal = scale, causal
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (probs,) = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    return torch.ops.megapre.scale_mask_softmax_bwd(grad, probs, ctx.scale, ctx.causal), None, None, None


def _register() -> None:
    @torch.library.register_fake("megapre::scale_mask_softmax_fwd")
    def _(scores, mask, scale, causal):
        return torch.empty_like(scores, memory_format=torch.contiguous_format)

    @torch.library.register_fake("megapre::scale_mask_softmax_bwd")
    def _(grad, probs, scale, causal):
        return torch.empty_like(probs, memory_format=torch.contiguous_format)

    torch.library.register_autograd("megapre::scale_mask_softmax_fwd", _backward,
                                    setup_context=_setup_context)


if STATE.cpu:
    _register()


def _check(scores, mask) -> None:
    _checks.floating("scores", scores)
    if scores.dim() != 4:
        raise ValueError(f"scores must be 4-D [batch, heads, sq, sk], got shape {list(scores.shape)}")
    if mask is None:
        return
    _checks.tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = masked), got {mask.dtype}")
    if mask.dim() != 4 or any(m not in (1, s) for m, s in zip(mask.shape, scores.shape)):
        raise ValueError(f"mask of shape {list(mask.shape)} does not broadcast to scores "
                         f"{list(scores.shape)}; use [batch or 1, 1, sq, sk]")
    _checks.same_device(scores=scores, mask=mask)


def scale_mask_softmax(scores, mask=None, scale: float = 1.0, causal: bool = False):
    """softmax(scores * scale) over the last dim, with keys where `mask` is True (or above the
    causal diagonal, aligned bottom-right when sq != sk) given probability 0. Rows with every
    key masked are zero in forward and backward. Returns probabilities in scores.dtype."""
    if export_mode.active():
        return export_mode.scale_mask_softmax(scores, mask, scale, causal)
    _check(scores, mask)
    if not compiled_for(scores.device):
        return reference.scale_mask_softmax(scores, mask, scale, causal)
    return torch.ops.megapre.scale_mask_softmax_fwd(scores, mask, float(scale), bool(causal))
