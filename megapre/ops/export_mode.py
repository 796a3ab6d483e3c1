"""Export mode: while `exporting()` is active the fused ops run as plain torch that graph
exporters (torch.export, torch.onnx) map one to one onto standard operators (LayerNormalization,
Softmax, Tanh-approximated GELU, ...), and host-syncing input checks are skipped (torch.export
cannot trace a branch on tensor values).

Why a flag rather than the reference ops: the reference definitions spell LayerNorm and
softmax out step by step (float32 upcasts, guards for all-masked rows) to pin the kernels'
semantics; an exported graph wants the one-operator forms its runtime fuses. Outside the
context the training path pays one module-level bool read per op call.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from .reference import causal_mask

_ACTIVE = False


def active() -> bool:
    """True inside `exporting()`."""
    return _ACTIVE


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """Run the enclosed model code in export mode (not thread-local: export in one thread)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, True
    try:
        yield
    finally:
        _ACTIVE = previous


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, residual=None):
    """megapre.ops.layer_norm as one F.layer_norm (ONNX LayerNormalization)."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, s)


def rms_norm(x, weight=None, eps: float = 1e-6, residual=None):
    """megapre.ops.rms_norm as one F.rms_norm (ONNX RMSNormalization, or its decomposition
    below opset 23)."""
    s = x if residual is None else x + residual
    y = F.rms_norm(s, (s.shape[-1],), weight, eps)
    return y if residual is None else (y, s)


def scale_mask_softmax(scores, mask=None, scale: float = 1.0, causal: bool = False):
    """softmax(scores * scale) with masked keys filled by the dtype's lowest value rather than
    -inf, so a fully masked row (a padding query) stays finite instead of NaN; visible rows get
    exactly 0 at masked keys, as the kernel does."""
    hidden = mask
    if causal:
        tri = causal_mask(scores.shape[-2], scores.shape[-1], scores.device)
        hidden = tri if hidden is None else hidden | tri
    s = scores * scale
    if hidden is not None:
        s = s.masked_fill(hidden, torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1)


def bias_gelu(x, bias=None):
    """gelu(x + bias) with the tanh approximation."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")
