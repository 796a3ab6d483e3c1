"""Rotary position embeddings (RoFormer): the rotate-half layout used by LLaMA and Megatron, or
Megatron's --rotary-interleaved (adjacent channel pairs, the original RoFormer / GPT-J layout).

Frequencies are computed in float32 on the fly for the positions asked for, so the table never
needs to be re-sized for longer sequences and is identical on every rank and pipeline stage.
"""
from __future__ import annotations

import torch


def rope_frequencies(positions: torch.Tensor, rot_dim: int, base: float = 10000.0,
                     interleaved: bool = False) -> torch.Tensor:
    """Angles [len(positions), rot_dim]: each frequency repeated for both halves, or (Megatron's
    --rotary-interleaved) for both channels of each adjacent pair."""
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=positions.device,
                                       dtype=torch.float32) / rot_dim))
    angles = positions.to(torch.float32)[:, None] * inv[None, :]
    if interleaved:
        return angles.repeat_interleave(2, dim=-1)
    return torch.cat([angles, angles], dim=-1)


def _rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """(-x2, x1) for the pairs RoPE rotates: the two halves, or adjacent channels."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first angles.shape[-1] channels of x [s, b, heads, head_dim] by angles [s, rot]
    (shared positions) or [s, b, rot] (per-sample positions, e.g. reset at document boundaries);
    the rest pass through (rotary_percent < 1). `interleaved` pairs channels (2i, 2i+1) instead
    of (i, i + rot/2); the angles must come from rope_frequencies(..., interleaved=True). Math in
    float32, result in x.dtype."""
    rot = angles.shape[-1]
    angles = angles[:, None, None, :] if angles.dim() == 2 else angles[:, :, None, :]
    cos, sin = angles.cos(), angles.sin()
    xr = x[..., :rot].float()
    out = (xr * cos + _rotate_half(xr, interleaved) * sin).to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat([out, x[..., rot:]], dim=-1)
