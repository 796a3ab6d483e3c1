"""Plain-torch definitions of every megapre op: the semantics the CPU and CUDA kernels must match,
and the fallback when the compiled library is missing. Math in float32 (float64 stays float64),
results in the input dtype.
"""
from __future__ import annotations

import torch

INT8_MAX = 127


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dim; with residual returns (norm(x + residual), x + residual)."""
    s = x if residual is None else x + residual
    sf = s.to(_compute_dtype(s))
    mean = sf.mean(-1, keepdim=True)
    var = (sf - mean).square().mean(-1, keepdim=True)
    y = (sf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(sf.dtype)
    if bias is not None:
        y = y + bias.to(sf.dtype)
    y = y.to(s.dtype)
    return y if residual is None else (y, s)


def rms_norm(x, weight=None, eps: float = 1e-6, residual=None):
    """RMSNorm over the last dim; with residual returns (norm(x + residual), x + residual)."""
    s = x if residual is None else x + residual
    sf = s.to(_compute_dtype(s))
    y = sf * torch.rsqrt(sf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(sf.dtype)
    y = y.to(s.dtype)
    return y if residual is None else (y, s)


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """True where key j is hidden from query i: j > i + (sk - sq) (bottom-right aligned, so the
    last query sees every key; the usual upper triangle when sq == sk)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j > i + (sk - sq)


def scale_mask_softmax(scores, mask=None, scale: float = 1.0, causal: bool = False):
    """softmax(scores * scale) over the last dim of [b, h, sq, sk] with masked keys (mask True,
    or causal) set to exactly 0; a row with every key masked is all zeros (never NaN)."""
    s = scores.to(_compute_dtype(scores)) * scale
    hidden = None
    if mask is not None:
        hidden = mask
    if causal:
        cm = causal_mask(scores.shape[-2], scores.shape[-1], scores.device)
        hidden = cm if hidden is None else hidden | cm
    if hidden is not None:
        s = s.masked_fill(hidden, float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max.detach())
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    return p.to(scores.dtype)


def bias_gelu(x, bias=None):
    """gelu(x + bias) with the tanh approximation, the bias added in float32 (Megatron's fused
    bias-GELU); result in x.dtype."""
    v = x.to(_compute_dtype(x))
    if bias is not None:
        v = v + bias.to(v.dtype)
    return torch.nn.functional.gelu(v, approximate="tanh").to(x.dtype)


def quantize_rowwise(x):
    """Symmetric absmax int8 quantization of each row of x [..., K]: q = round(x * 127/amax),
    scale = amax / 127 (float32, shape x.shape[:-1]); an all-zero row gets scale 0, q 0."""
    xf = x.float()
    amax = xf.abs().amax(-1) if x.shape[-1] > 0 else xf.new_zeros(x.shape[:-1])
    # A true fp32 division: `INT8_MAX / amax` would be reciprocal(amax) * 127 in torch (two
    # roundings), 1 ulp off the kernels' 127 / amax in some rows.
    inv = torch.where(amax > 0, torch.full_like(amax, INT8_MAX) / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax / INT8_MAX


quantize_per_token = quantize_rowwise


def quantize_per_channel(w):
    """Per-output-channel (row of [N, K]) symmetric int8 weights and float32 scales [N]."""
    return quantize_rowwise(w)


def int8_gemm(x_int8, x_scale, w_int8, w_scale, bias=None, out_dtype=torch.float32):
    """out = float(x_int8 @ w_int8.T) * x_scale[..., None] * w_scale + bias, int32-exact
    accumulation (done in float64 here, exact for any realistic K)."""
    acc = (x_int8.double() @ w_int8.double().t()).float()
    out = acc * x_scale.float().unsqueeze(-1) * w_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_linear(x, w_int8, w_scale, bias=None):
    """W8A8 linear: dynamic per-token activation quantization, then int8_gemm in x's dtype."""
    xq, xs = quantize_per_token(x)
    return int8_gemm(xq, xs, w_int8, w_scale, bias, out_dtype=x.dtype)


def weight_only_int8_linear(x, w_int8, w_scale, bias=None):
    """x @ (w_int8 * w_scale[:, None]).T + bias with float32 accumulation, in x's dtype."""
    out = (x.float() @ w_int8.float().t()) * w_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
