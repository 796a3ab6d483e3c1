"""Autograd-aware collectives for tensor and sequence parallelism.

Each function is a pair (forward op, backward op) whose backward is the adjoint of its forward:

    copy_to_tp          identity            | all-reduce          (input of a column-parallel layer)
    reduce_from_tp      all-reduce          | identity            (output of a row-parallel layer)
    scatter_to_tp       keep my last-dim chunk | all-gather last dim
    gather_from_tp      all-gather last dim | keep my chunk
    scatter_to_sp       keep my seq chunk   | all-gather seq
    gather_from_sp      all-gather seq      | reduce-scatter seq (or keep my chunk, see below)
    reduce_scatter_to_sp  reduce-scatter seq | all-gather seq

The sequence dimension is explicit (`dim`, default 0 for Megatron's [s, b, h] activations).
`group=None` means "no parallelism" (one process): every function is then the identity, so
single-process code paths pay nothing. Under torch.distributed pass the mesh's group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

Group = ProcessGroup | None

# torch >= 2.10 names the single-tensor collectives *_single; older releases *_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


# -- raw (non-autograd) collectives --------------------------------------------------------------
def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _check_divisible(x: torch.Tensor, dim: int, size: int, what: str) -> None:
    if x.size(dim) % size:
        raise ValueError(
            f"{what}: dimension {dim} of a tensor of shape {tuple(x.shape)} has length "
            f"{x.size(dim)}, which is not divisible by the tensor-parallel size {size}; "
            + ("under sequence parallelism --seq-length (times the micro-batch size if the "
               "sequence is folded into it) must be a multiple of --tensor-model-parallel-size"
               if "sequence" in what else "pick sizes that divide evenly"))


def _split(x: torch.Tensor, dim: int, group: Group, what: str) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    _check_divisible(x, dim, size, what)
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * moved.size(0),) + moved.shape[1:], dtype=x.dtype, device=x.device)
    _all_gather_single(out, moved, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group, what: str) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    _check_divisible(x, dim, size, what)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.size(0) // size,) + moved.shape[1:], dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


# -- autograd functions --------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group, "scatter_to_tp (last dim)")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group, "gather_from_tp backward (last dim)"), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group, "scatter_to_sp (sequence dim)")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, grad_is_partial):
        ctx.group, ctx.dim, ctx.partial = group, dim, grad_is_partial
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        what = "gather_from_sp backward (sequence dim)"
        if ctx.partial:
            return _reduce_scatter(grad, ctx.dim, ctx.group, what), None, None, None
        return _split(grad, ctx.dim, ctx.group, what), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, dim, group, "reduce_scatter_to_sp (sequence dim)")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


# -- public API ----------------------------------------------------------------------------------
def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward identity; backward all-reduce (each TP rank's partial input grad is summed)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward all-reduce of partial sums; backward identity."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; backward all-gathers it."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather along the last dim (rank order); backward keeps this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Keep this rank's chunk of the sequence dim; backward all-gathers it."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group, dim)


def gather_from_sp(x: torch.Tensor, group: Group, dim: int = 0,
                   grad_is_partial: bool = True) -> torch.Tensor:
    """All-gather the sequence dim.

    Backward reduce-scatters when the consumer is tensor-parallel (each rank's grad is a partial
    sum, as before a column-parallel linear); with `grad_is_partial=False` (the consumer is
    replicated, e.g. a gathered output) each rank keeps its chunk of the full gradient.
    """
    if group_size(group) == 1:
        return x
    return _GatherFromSP.apply(x, group, dim, grad_is_partial)


def reduce_scatter_to_sp(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sum partial results over TP and keep this rank's sequence chunk; backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group, dim)


def all_reduce_grads(params, group: Group) -> None:
    """Sum `.grad` of the given parameters over `group` in place (one flat buffer).

    Used for weights replicated over TP whose inputs were sequence-sharded (norms, row-parallel
    bias under sequence parallelism): each rank saw only its part of the sequence.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if group_size(group) == 1 or not grads:
        return
    for dtype in dict.fromkeys(g.dtype for g in grads):  # same order on every rank
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
