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


def _gamma(h: int, zero_centered: bool, kw: dict) -> torch.Tensor:
    """The norm's scale parameter at init: ones, or zeros when it is stored zero-centred."""
    return torch.zeros(h, **kw) if zero_centered else torch.ones(h, **kw)


def _scale(weight: torch.Tensor | None, zero_centered: bool) -> torch.Tensor | None:
    """Megatron's --apply-layernorm-1p: the stored weight is gamma - 1, so weight decay pulls
    gamma towards 1 rather than 0, and the kernel gets 1 + weight."""
    return weight + 1 if zero_centered and weight is not None else weight


class LayerNorm(nn.Module):
    """Drop-in for torch.nn.LayerNorm (last dim); forward(x, residual=None) fuses the residual add."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, zero_centered_gamma: bool = False):
        super().__init__()
        h = _hidden(normalized_shape)
        self.normalized_shape = (h,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.zero_centered_gamma = zero_centered_gamma
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(_gamma(h, zero_centered_gamma, kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(h, **kw)) if elementwise_affine and bias else None

    def forward(self, x, residual=None):
        return layer_norm(x, _scale(self.weight, self.zero_centered_gamma), self.bias, self.eps,
                          residual)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine="
                f"{self.elementwise_affine}" + (", zero_centered_gamma=True"
                                                if self.zero_centered_gamma else ""))


class RMSNorm(nn.Module):
    """Drop-in for torch.nn.RMSNorm (last dim); eps=None uses torch's default, the machine
    epsilon of the compute dtype: float32's for float16/bfloat16 inputs (torch.nn.RMSNorm takes
    it from the op-math type, not finfo(x.dtype), which would be 65536x larger for bf16)."""

    def __init__(self, normalized_shape, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None, zero_centered_gamma: bool = False):
        super().__init__()
        h = _hidden(normalized_shape)
        self.normalized_shape = (h,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.zero_centered_gamma = zero_centered_gamma
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(_gamma(h, zero_centered_gamma, kw)) if elementwise_affine else None

    def forward(self, x, residual=None):
        eps = self.eps
        if eps is None:
            eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
        return rms_norm(x, _scale(self.weight, self.zero_centered_gamma), eps, residual)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine="
                f"{self.elementwise_affine}" + (", zero_centered_gamma=True"
                                                if self.zero_centered_gamma else ""))


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
