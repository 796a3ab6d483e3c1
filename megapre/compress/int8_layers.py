"""Int8 tensor-parallel linear layers: the quantized twins of ColumnParallelLinear,
RowParallelLinear and the vocab-parallel output layer, running megapre's int8 kernels.

Each holds an int8 weight and one float32 scale per output channel (symmetric absmax, weights in
[-127, 127]), sharded like the float layer so a checkpoint reshards under any TP size:

* column-parallel (W [N, K] split by rows): weight [N/tp, K] and scale [N/tp] both carry
  `tensor_parallel_dim = 0`; a row's scale travels with the row.
* row-parallel (W split along K): weight [N, K/tp] with `tensor_parallel_dim = 1`, scale [N]
  replicated; it is the absmax over the *full* row, so the int8 values do not depend on TP.
* LM head (weight-only, per vocabulary row): weight and scale are vocabulary tables (stored
  unpadded, like the word embedding; megapre.train.state_dict.VOCAB_TABLES).

Modes: 'weight_only' keeps activations in floating point (`ops.weight_only_int8_linear`, the
decode GEMV case); 'w8a8' quantizes activations per token on the fly. Under a row-parallel layer a
token's activation scale must come from its full K row, not this rank's slice, or each TP size
would round differently: each rank's per-token absmax is all-reduced (MAX) over TP, the slice is
quantized with that scale and `ops.int8_gemm` multiplies it; the partial products are then
reduced as in the float layer. So every layout computes what one process computes (up to the
order of the float partial sums).

Weights are int8 Parameters with requires_grad=False (so the checkpoint code, which walks
parameters, saves and reshards them like any weight). Forward only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megapre import ops
from megapre.parallel.comm import (copy_to_tp, gather_from_sp, gather_from_tp, group_size,
                                   reduce_from_tp, reduce_scatter_to_sp, scatter_to_tp)
from megapre.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megapre.parallel.mesh import ParallelMesh

INT8_MAX = 127.0
MODES = ("weight_only", "w8a8")


def quantize_with_amax(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Rows of x [..., K] to int8 with the given absmax per row [...] (which may exceed the row's
    own): the rounding of megapre.ops.reference.quantize_rowwise, scale = amax / 127."""
    inv = torch.where(amax > 0, torch.full_like(amax, INT8_MAX) / amax, torch.zeros_like(amax))
    return torch.round(x.float() * inv.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def row_absmax(x: torch.Tensor, group) -> torch.Tensor:
    """float32 absmax of each row of x [..., K/tp] over the full K (MAX over the TP group)."""
    amax = x.detach().float().abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1],
                                                                               dtype=torch.float32)
    if group_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def quantize_full_rows(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 of this rank's slice x [..., K/tp] with the scale of the full K row:
    (int8 [..., K/tp], float32 scale [...]). The compiled quantizer takes each row's own absmax,
    so the full-row absmax rides along as one extra column (it is >= every entry of the slice)
    and is dropped after: the rounding is the kernel's, the scale the whole row's."""
    if group_size(group) == 1:
        return ops.quantize_per_token(x)
    amax = row_absmax(x, group)
    q, scale = ops.quantize_per_token(torch.cat([x.float(), amax.unsqueeze(-1)], -1))
    return q[..., :-1].contiguous(), scale


def _int8_rows(w: torch.Tensor, amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-row scale) of `w` given each row's absmax; None only allocates (a
    checkpoint load fills the values)."""
    if amax is None:
        return (torch.zeros(w.shape, dtype=torch.int8, device=w.device),
                torch.zeros(w.shape[0], dtype=torch.float32, device=w.device))
    return quantize_with_amax(w, amax), amax / INT8_MAX


def _frozen(t: torch.Tensor, tp_dim: int | None) -> nn.Parameter:
    p = nn.Parameter(t.contiguous(), requires_grad=False)
    if tp_dim is not None:
        p.tensor_parallel_dim = tp_dim
    return p


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"int8 layer mode must be one of {MODES}, got {mode!r}")


class _Int8Mixin:
    """Shared by both layers: take over the float layer's attributes and bias."""

    weight: nn.Parameter
    weight_scale: nn.Parameter
    mode: str

    def _adopt(self, base: nn.Module, mode: str) -> None:
        _check_mode(mode)
        nn.Module.__init__(self)
        for key, value in vars(base).items():
            if not key.startswith("_") and key not in ("weight", "bias", "training"):
                self.__dict__[key] = value
        self.bias = base.bias  # stays floating point (and keeps its sequence_parallel flag)
        self.mode = mode
        self.train(False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 {self.mode}"


class Int8ColumnParallelLinear(_Int8Mixin, ColumnParallelLinear):
    """ColumnParallelLinear with int8 rows and per-row scales (both split over TP)."""

    @classmethod
    def from_float(cls, base: ColumnParallelLinear, mode: str, quantize: bool = True
                   ) -> "Int8ColumnParallelLinear":
        """`quantize=False` only allocates (a checkpoint load fills the values)."""
        layer = cls.__new__(cls)
        layer._adopt(base, mode)
        w = base.weight.detach()
        # a row's scale needs only its own row
        q, scale = _int8_rows(w, w.float().abs().amax(1) if quantize else None)
        layer.weight, layer.weight_scale = _frozen(q, 0), _frozen(scale, 0)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.local_input(x)
        bias = None if self.skip_bias_add else self.bias
        kernel = ops.int8_linear if self.mode == "w8a8" else ops.weight_only_int8_linear
        y = kernel(x, self.weight, self.weight_scale, _like(bias, x))
        return gather_from_tp(y, self.group) if self.gather_output else y


class Int8RowParallelLinear(_Int8Mixin, RowParallelLinear):
    """RowParallelLinear with int8 weights split along K and full-row scales (replicated)."""

    @classmethod
    def from_float(cls, base: RowParallelLinear, mode: str, quantize: bool = True
                   ) -> "Int8RowParallelLinear":
        layer = cls.__new__(cls)
        layer._adopt(base, mode)
        w = base.weight.detach()
        # over the whole row, whatever the TP size
        q, scale = _int8_rows(w, row_absmax(w, base.group) if quantize else None)
        layer.weight, layer.weight_scale = _frozen(q, 1), _frozen(scale, None)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        single = group_size(self.group) == 1
        bias = _like(self.bias, x) if single else None
        if self.mode == "w8a8":
            xq, xs = quantize_full_rows(x, self.group)
            y = ops.int8_gemm(xq, xs, self.weight, self.weight_scale, bias, out_dtype=x.dtype)
        else:
            y = ops.weight_only_int8_linear(x, self.weight, self.weight_scale, bias)
        if single:
            return y
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, self.group, self.sequence_dim)
        else:
            y = reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y


class Int8VocabHead(nn.Module):
    """The GPT output layer with int8 vocabulary rows (weight-only, per-row scales): logits
    [s, b, vocab/tp] as megapre.model.lm_head.parallel_logits gives them. Padding rows are zero
    (weight and scale), so their logits are 0 and the loss masks them as before."""

    def __init__(self, weight: torch.Tensor, mesh: ParallelMesh, quantize: bool = True) -> None:
        super().__init__()
        self.mesh = mesh
        w = weight.detach()
        q, scale = _int8_rows(w, w.float().abs().amax(1) if quantize else None)
        self.weight, self.weight_scale = _frozen(q, 0), _frozen(scale, 0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mesh.sequence_parallel:
            h = gather_from_sp(h, self.mesh.tp_group, 0, grad_is_partial=True)
        else:
            h = copy_to_tp(h, self.mesh.tp_group)
        return ops.weight_only_int8_linear(h, self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"vocab rows {self.weight.shape[0]} (local), hidden {self.weight.shape[1]}, int8"


def _like(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The float bias in the activations' dtype (bf16 autocast runs bf16 activations)."""
    return None if bias is None else bias.to(x.dtype)


INT8_LAYERS = (Int8ColumnParallelLinear, Int8RowParallelLinear)
