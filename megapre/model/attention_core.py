"""Core attention on the local heads: softmax(q k^T / sqrt(d) + mask) v.

Two interchangeable backends, chosen by ``TransformerConfig.attention_backend`` (``sdpa-flash``
and ``sdpa-efficient`` are ``sdpa`` preferring one of torch's kernels, Megatron's flash / fused):
``fused`` materializes the scores and runs megapre's fused scale-mask-softmax kernel (exact,
any length, fully masked rows give zeros); ``sdpa`` calls torch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs, a flash kernel on
CPUs that skips the causal upper triangle). ``auto`` (the default) picks per call, see
``resolve_backend``. Tensors are
[s, b, heads, head_dim] as in Megatron; grouped-query attention repeats each key/value head
for its group of query heads.

Under context parallelism (a ``context`` ring is given) each rank holds a zig-zag share of the
sequence and attention runs as megapre.parallel.context's ring: plain-torch block attention with
an online softmax, exact in fp32, whatever the backend setting.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from megapre import ops
from megapre.ops import export_mode
from megapre.parallel.context import ContextGroup, ring_attention


def resolve_backend(backend: str, device_type: str, dropout_active: bool, masked: bool) -> str:
    """'auto' -> 'sdpa' on GPUs, and on CPUs for unmasked (causal or full) attention without
    dropout, where torch's CPU flash kernel skips the causal upper triangle. Otherwise 'fused'
    on CPUs: with attention dropout SDPA falls back to its unfused math path (slower, three s x s
    float32 tensors kept for backward), and with a mask it keeps a float32 copy of the mask per
    layer, where the fused kernel reads the bool mask."""
    if export_mode.active():  # plain matmul + softmax: one graph for every runtime
        return "fused"
    if backend != "auto":
        return backend
    return "fused" if device_type == "cpu" and (dropout_active or masked) else "sdpa"


def _preferring(backend: str) -> ContextManager:
    """SDPA with Megatron's --attention-backend preference: flash or memory-efficient kernel
    first, falling back (to the other, then the math path) where the preferred kernel does not
    take these inputs (no memory-efficient kernel on CPUs, no flash kernel for some masks)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"sdpa-flash": SDPBackend.FLASH_ATTENTION,
             "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}.get(backend)
    if first is None:
        return contextlib.nullcontext()
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                   SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH) if b != first]
    return sdpa_kernel(order, set_priority=True)


class CoreAttention(nn.Module):
    def __init__(self, head_dim: int, attention_dropout: float, backend: str = "auto",
                 dropout_rng: Callable[[], ContextManager] | None = None,
                 context: ContextGroup | None = None) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(head_dim)
        self.dropout_p = attention_dropout
        self.backend = backend
        # Attention-probability dropout runs on TP-sharded heads: the caller passes the RNG
        # tracker's fork so each TP rank draws its own mask (identical masks would correlate).
        self.dropout_rng = dropout_rng or contextlib.nullcontext
        self.context = context  # the CP ring, None without context parallelism

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None, *, causal: bool = False) -> torch.Tensor:
        """q [sq, b, nh, d]; k, v [sk, b, ng, d]; mask bool [b or 1, 1, sq, sk], True = masked.
        Returns [sq, b, nh * d]. Under context parallelism sq = sk = this rank's s/cp tokens
        and the mask's columns are the whole sequence (megapre.parallel.context)."""
        sq, b, nh, d = q.shape
        if self.context is not None:
            return self._ring(q, k, v, mask, causal)
        if k.shape[2] != nh:
            k = k.repeat_interleave(nh // k.shape[2], dim=2)
            v = v.repeat_interleave(nh // v.shape[2], dim=2)
        qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        dropout_active = self.training and self.dropout_p > 0
        backend = resolve_backend(self.backend, q.device.type, dropout_active, mask is not None)
        if backend.startswith("sdpa"):
            with _preferring(backend):
                ctx = self._sdpa(qb, kb, vb, mask, causal)
        else:
            ctx = self._fused(qb, kb, vb, mask, causal)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, nh * d)

    def _ring(self, q, k, v, mask, causal):
        if self.training and self.dropout_p > 0:
            raise ValueError("context parallelism draws no attention-dropout masks: set "
                             "--attention-dropout 0 with --context-parallel-size > 1")
        sq, b, nh, d = q.shape  # k/v travel the ring with their own (grouped) heads
        ctx = ring_attention(q, k, v, self.context, scale=self.scale, causal=causal, mask=mask)
        return ctx.view(sq, b, nh * d)

    def _fused(self, q, k, v, mask, causal):
        scores = torch.matmul(q, k.transpose(-1, -2))
        probs = ops.scale_mask_softmax(scores, mask, scale=self.scale, causal=causal)
        if self.training and self.dropout_p > 0:
            with self.dropout_rng():
                probs = F.dropout(probs, self.dropout_p)
        return torch.matmul(probs, v)

    def _sdpa(self, q, k, v, mask, causal):
        sq, sk = q.shape[-2], k.shape[-2]
        if causal and (mask is not None or sq != sk):
            # torch aligns is_causal top-left when sq != sk; ours is bottom-right: spell it out
            tri = ops.reference.causal_mask(sq, sk, device=q.device)
            mask = tri if mask is None else (mask | tri)
            causal = False
        keep = None if mask is None else ~mask
        dropout = self.dropout_p if self.training else 0.0
        with self.dropout_rng() if dropout > 0 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout,
                                                 is_causal=causal,
                                                 scale=self.scale)
        if keep is not None:
            # torch gives NaN for a query whose keys are all masked; the fused path gives zeros.
            out = out.masked_fill(~keep.any(-1, keepdim=True), 0.0)
        return out
