"""The transformer block on tensor-parallel layers, shared by GPT and BERT: pre-LN (Megatron)

    h   = x + dropout(attention(norm1(x)))
    out = h + dropout(mlp(norm2(h)))

or, with --post-layernorm, post-LN (the original BERT; the models then add a norm after the
embeddings and drop the final norm)

    h   = norm1(x + dropout(attention(x)))
    out = norm2(h + dropout(mlp(h)))

Activations are [s, b, hidden] (Megatron's layout); under sequence parallelism the norms and
dropouts see this rank's [s/tp, b, hidden] slice and the column/row-parallel layers gather and
reduce-scatter the sequence. A residual add and the norm after it are one fused kernel
(megapre.ops norm with `residual=`).

Names: a stack keeps its layers in a ModuleDict keyed by the *global* layer index, so a module's
path is the same in every pipeline layout (`decoder.layers.7.mlp.fc1.weight` on whichever stage
holds layer 7). Each module is told its path (`prefix`) when built and seeds its weights' init
generators with it, so the init name, the module path and the checkpoint key are one name.

Cross-layer sharing (ALBERT, --share-layers-every K): layers [jK, (j+1)K) run one weight set,
the module built for layer jK; the ModuleDict holds only those owners, so each set has one name
(`decoder.layers.{jK}...`), one checkpoint entry and one optimizer state, and autograd sums the
K uses' gradients into it. `TransformerStack.uses` lists (global layer number, module) for
every layer, the number being the KV cache's slot. A set never straddles pipeline stages
(megapre.parallel.layout.check_shared_layers).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megapre import ops
from megapre.parallel.context import ContextGroup
from megapre.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.random import RNGTracker, recompute

from . import init
from .attention_core import CoreAttention
from .config import TransformerConfig
from .rope import apply_rope


def make_norm(cfg: TransformerConfig, mesh: ParallelMesh) -> nn.Module:
    """LayerNorm or RMSNorm (fused kernels). Under sequence parallelism each TP rank sees a
    different slice of the sequence, so the weight grads are partial and are summed over TP."""
    kind = ops.RMSNorm if cfg.normalization == "RMSNorm" else ops.LayerNorm
    norm = kind(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=mesh.device,
                zero_centered_gamma=cfg.layernorm_zero_centered_gamma)
    for p in norm.parameters():
        p.sequence_parallel = mesh.sequence_parallel
    return norm


def final_norm(cfg: TransformerConfig, mesh: ParallelMesh) -> nn.Module:
    """The norm after the last layer; post-LN blocks already end with one (identity then)."""
    return nn.Identity() if cfg.post_layernorm else make_norm(cfg, mesh)


def _head_norm(cfg: TransformerConfig, mesh: ParallelMesh) -> nn.Module:
    """The norm layer over one head's channels (--qk-layernorm), replicated over TP."""
    kind = ops.RMSNorm if cfg.normalization == "RMSNorm" else ops.LayerNorm
    norm = kind(cfg.head_dim, eps=cfg.layernorm_epsilon, device=mesh.device,
                zero_centered_gamma=cfg.layernorm_zero_centered_gamma)
    for p in norm.parameters():
        p.tp_partial_grad = mesh.tp_size > 1
    return norm


class Dropout(nn.Module):
    """Dropout on the residual stream. When the stream is sequence-sharded the ranks hold
    different tokens, so the mask comes from the tracker's per-TP-rank stream (as Megatron)."""

    def __init__(self, p: float, mesh: ParallelMesh, tracker: RNGTracker | None) -> None:
        super().__init__()
        self.p = p
        self.fork = tracker.fork if (tracker is not None and mesh.sequence_parallel) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with self.fork() if self.fork else contextlib.nullcontext():
            return F.dropout(x, self.p, training=True)


class SelfAttention(nn.Module):
    """Multi-head / grouped-query self-attention with this TP rank's heads.

    The fused QKV weight is laid out per key/value group, [q heads of group, k, v] for group 0,
    then group 1, ..., so splitting its rows over TP gives every rank whole groups.
    """

    def __init__(self, cfg: TransformerConfig, mesh: ParallelMesh, prefix: str, seed: int,
                 tracker: RNGTracker | None) -> None:
        super().__init__()
        tp = mesh.tp_size
        self.head_dim = cfg.head_dim
        self.groups = cfg.num_query_groups // tp
        self.q_per_group = cfg.num_attention_heads // cfg.num_query_groups
        qkv_out = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim
        std = cfg.init_method_std
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, qkv_out, mesh, bias=cfg.add_qkv_bias,
            init_method=init.normal(seed, f"{prefix}.qkv.weight", std))
        self.core = CoreAttention(cfg.head_dim, cfg.attention_dropout, cfg.attention_backend,
                                  dropout_rng=tracker.fork if tracker is not None else None,
                                  context=ContextGroup.from_mesh(mesh))
        self.proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, mesh,
            bias=cfg.add_bias_linear,
            init_method=init.normal(seed, f"{prefix}.proj.weight",
                                    init.scaled_std(std, cfg.num_layers)))
        self.recompute_core = False
        self.tracker = tracker
        self.rotary_interleaved = cfg.rotary_interleaved
        # Megatron's --qk-layernorm: one norm over head_dim for all query heads, one for all key
        # heads; each TP rank sees only its heads, so their grads are partial sums over TP
        self.q_norm = self.k_norm = None
        if cfg.qk_layernorm:
            self.q_norm, self.k_norm = _head_norm(cfg, mesh), _head_norm(cfg, mesh)

    def heads(self, x: torch.Tensor, rope: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [s, b, heads, d], k and v [s, b, groups, d] of this rank's heads: projected, normed
        (--qk-layernorm) and rotated (RoPE). Shared by training and the KV-cache decoder."""
        qkv = self.qkv(x)
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.groups, self.q_per_group + 2, self.head_dim)
        # split (not slicing) so backward concatenates the three grads instead of zero-filling
        # three full-size buffers
        q, k, v = torch.split(qkv, [self.q_per_group, 1, 1], dim=3)
        q = q.reshape(s, b, self.groups * self.q_per_group, self.head_dim)
        k, v = k.squeeze(3), v.squeeze(3)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, rope, self.rotary_interleaved)
            k = apply_rope(k, rope, self.rotary_interleaved)
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, *, causal: bool,
                rope: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.heads(x, rope)
        if self.recompute_core:  # selective recompute: the s^2 activations are cheap to redo
            ctx = recompute(self.core, q, k, v, mask, causal=causal, tracker=self.tracker)
        else:
            ctx = self.core(q, k, v, mask, causal=causal)
        return self.proj(ctx)


class MLP(nn.Module):
    """fc2(act(fc1(x))), act GELU or ReLU^2; SwiGLU adds a gate projection: fc2(silu(gate(x)) * fc1(x)). Gate and
    fc1 are separate column-parallel layers so each TP rank's slices of both line up for any TP."""

    def __init__(self, cfg: TransformerConfig, mesh: ParallelMesh, prefix: str, seed: int) -> None:
        super().__init__()
        std = cfg.init_method_std
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.swiglu = cfg.activation == "swiglu"
        self.squared_relu = cfg.activation == "squared_relu"
        # GELU MLP: the fused kernel adds fc1's bias and applies GELU in one pass
        self.fused_gelu = cfg.activation == "gelu" and cfg.bias_activation_fusion
        self.approximate = "none" if cfg.activation == "gelu_erf" else "tanh"  # the kernel: tanh
        self.fc1 = ColumnParallelLinear(h, f, mesh, bias=cfg.add_bias_linear,
                                        init_method=init.normal(seed, f"{prefix}.fc1.weight", std),
                                        skip_bias_add=self.fused_gelu)
        self.gate = ColumnParallelLinear(
            h, f, mesh, bias=cfg.add_bias_linear,
            init_method=init.normal(seed, f"{prefix}.gate.weight", std)) if self.swiglu else None
        self.fc2 = RowParallelLinear(
            f, h, mesh, bias=cfg.add_bias_linear,
            init_method=init.normal(seed, f"{prefix}.fc2.weight",
                                    init.scaled_std(std, cfg.num_layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.fc2(F.silu(self.gate(x)) * self.fc1(x))
        if self.squared_relu:  # Megatron's --squared-relu (Primer)
            return self.fc2(F.relu(self.fc1(x)).square())
        if self.fused_gelu:
            return self.fc2(ops.bias_gelu(self.fc1(x), self.fc1.bias))
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, mesh: ParallelMesh, layer_number: int, seed: int,
                 tracker: RNGTracker | None, prefix: str) -> None:
        super().__init__()
        self.layer_number = layer_number  # global index (its set's first layer when shared)
        self.norm1 = make_norm(cfg, mesh)
        self.attention = SelfAttention(cfg, mesh, f"{prefix}.attention", seed, tracker)
        self.norm2 = make_norm(cfg, mesh)
        self.mlp = MLP(cfg, mesh, f"{prefix}.mlp", seed)
        self.dropout1 = Dropout(cfg.hidden_dropout, mesh, tracker)
        self.dropout2 = Dropout(cfg.hidden_dropout, mesh, tracker)
        self.post_layernorm = cfg.post_layernorm

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, causal: bool = False,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(x, lambda y: self.attention(y, mask, causal=causal, rope=rope))

    def block(self, x: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
        """The norms and residual adds around `attend` (attention of its input) and the MLP;
        one place for both orderings, which the KV-cache decoder reuses with its own attend.
        Under autocast a bias-free projection returns bf16/fp16 while the residual stream stays
        fp32; the fused add + norm takes one dtype."""
        if self.post_layernorm:
            h = self.norm1(self.dropout1(attend(x)).to(x.dtype), residual=x)[0]
            return self.norm2(self.dropout2(self.mlp(h)).to(h.dtype), residual=h)[0]
        a = self.dropout1(attend(self.norm1(x)))
        normed, h = self.norm2(a.to(x.dtype), residual=x)
        return h + self.dropout2(self.mlp(normed))


def parse_recompute(spec: str | None) -> tuple[str | None, str, int]:
    """(granularity, method, layers) of a recompute spec: None, 'selective', 'full', or
    'full:uniform:N' / 'full:block:N' (Megatron's --recompute-method / --recompute-num-layers;
    plain 'full' is 'full:uniform:1'). One string so it passes unchanged through the builders."""
    if spec is None or spec == "selective":
        return spec, "uniform", 1
    parts = spec.split(":")
    if parts[0] != "full" or len(parts) not in (1, 3) or (
            len(parts) == 3 and (parts[1] not in ("uniform", "block") or not parts[2].isdigit()
                                 or int(parts[2]) < 1)):
        raise ValueError(f"--recompute-granularity={spec!r} must be 'full' or 'selective' (or "
                         "unset); --recompute-method uniform|block with --recompute-num-layers "
                         "N >= 1")
    return ("full", "uniform", 1) if len(parts) == 1 else ("full", parts[1], int(parts[2]))


class TransformerStack(nn.Module):
    """Layers [first, last) of the model (a pipeline stage's share), keyed by global index, with
    optional activation recomputation (`parse_recompute`): 'full' reruns layers in backward,
    in groups of N ('uniform': one saved input per group) or only the first N of this chunk
    ('block'); 'selective' only the attention core. `prefix` is the stack's path in the model
    ('decoder', 'encoder'). With --share-layers-every K only each set's first layer is built."""

    def __init__(self, cfg: TransformerConfig, mesh: ParallelMesh, first: int, last: int,
                 seed: int, tracker: RNGTracker | None, recompute_granularity: str | None = None,
                 *, prefix: str) -> None:
        super().__init__()
        granularity, self.recompute_method, self.recompute_layers = \
            parse_recompute(recompute_granularity)
        self.first, self.last, self.owner = first, last, cfg.shared_owner
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(cfg, mesh, i, seed, tracker, prefix=f"{prefix}.layers.{i}")
            for i in range(first, last) if cfg.shared_owner(i) == i})
        self.full_recompute = granularity == "full"
        self.tracker = tracker
        for layer in self.layers.values():
            layer.attention.recompute_core = granularity == "selective"

    def uses(self) -> list[tuple[int, TransformerLayer]]:
        """(global layer number, the module it runs) for layers [first, last) in order; a shared
        set's module appears once per layer that reuses it."""
        return [(i, self.layers[str(self.owner(i))]) for i in range(self.first, self.last)]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, causal: bool = False,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        layers = [layer for _, layer in self.uses()]
        if not (self.full_recompute and self.training):
            for layer in layers:
                x = layer(x, mask, causal=causal, rope=rope)
            return x
        n = self.recompute_layers
        if self.recompute_method == "block":
            for i, layer in enumerate(layers):
                x = (recompute(layer, x, mask, causal=causal, rope=rope, tracker=self.tracker)
                     if i < n else layer(x, mask, causal=causal, rope=rope))
            return x
        for start in range(0, len(layers), n):
            group = functools.partial(_run_layers, layers[start:start + n])
            x = recompute(group, x, mask, causal=causal, rope=rope, tracker=self.tracker)
        return x


def _run_layers(layers: list[nn.Module], x: torch.Tensor, mask: torch.Tensor | None = None, *,
                causal: bool = False, rope: torch.Tensor | None = None) -> torch.Tensor:
    """Consecutive layers as one recompute unit."""
    for layer in layers:
        x = layer(x, mask, causal=causal, rope=rope)
    return x
