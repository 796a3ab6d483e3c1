"""nn.Module faces of the fused ops. Parameter and buffer names match torch.nn.LayerNorm /
torch.nn.RMSNorm so their state dicts load as they are."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from .norm import layer_norm, rms_norm
from .quant import int8_linear, quantize_per_channel, weight_only_int8_linear
from .softmax import scale_mask_softmax


def _hidden(normalized_shape) -> int:
    if isinstance(normalized_shape, numbers.Integral):
        return int(normalized_shape)
    shape = tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"megapre norms normalize over the last dim only; normalized_shape={shape}")
    return int(shape[0])


class LayerNorm(nn.Module):
    """Drop-in for torch.nn.LayerNorm (last dim); forward(x, residual=None) fuses the residual add."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        h = _hidden(normalized_shape)
        self.normalized_shape = (h,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(h, **kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(h, **kw)) if elementwise_affine and bias else None

    def forward(self, x, residual=None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(nn.Module):
    """Drop-in for torch.nn.RMSNorm (last dim); eps=None uses torch's default
    (finfo(x.dtype).eps), as torch.nn.RMSNorm does."""

    def __init__(self, normalized_shape, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__()
        h = _hidden(normalized_shape)
        self.normalized_shape = (h,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.weight = nn.Parameter(torch.ones(h, device=device, dtype=dtype)) if elementwise_affine else None

    def forward(self, x, residual=None):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps, residual)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class FusedScaleMaskSoftmax(nn.Module):
    """Attention probabilities softmax(scores * scale) with padding and/or causal masking."""

    def __init__(self, scale: float = 1.0, causal: bool = False):
        super().__init__()
        self.scale = scale
        self.causal = causal

    def forward(self, scores, mask=None):
        return scale_mask_softmax(scores, mask, self.scale, self.causal)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, causal={self.causal}"


class Int8Linear(nn.Module):
    """Linear layer with int8 weights (per-output-channel scales). mode='w8a8' quantizes
    activations per token on the fly and runs an int8 GEMM; mode='weight_only' keeps
    activations in floating point. Forward only; the state dict holds int8 weights + scales."""

    MODES = ("w8a8", "weight_only")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "w8a8") -> "Int8Linear":
        """Quantize a float nn.Linear's weights per output channel."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, w.device,
                linear.bias.dtype if linear.bias is not None else torch.float32)
        wq, ws = quantize_per_channel(w.float() if w.dtype == torch.float64 else w)
        q.weight.copy_(wq)
        q.weight_scale.copy_(ws)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def forward(self, x):
        if self.mode == "w8a8":
            return int8_linear(x, self.weight, self.weight_scale, self.bias)
        return weight_only_int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}")
