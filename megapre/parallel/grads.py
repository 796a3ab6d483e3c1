"""The global gradient norm of a model split over TP, PP and DP, and clipping by it.

The norm must be the one the single-process model would compute, whatever the layout:

* a TP-sharded parameter (`param.tensor_parallel_dim` set) holds a different slice on each TP
  rank: its squares are summed over TP;
* a TP-replicated parameter holds the same gradient on every TP rank (after the
  sequence-parallel sync): counted once, on TP rank 0;
* each pipeline stage holds different layers: summed over PP;
* the last stage's copy of a tied word embedding duplicates the first stage's: the caller
  leaves it out of `params`;
* after the DP x CP reduction every DP and CP rank holds the same gradients: neither is summed
  (the distributed optimizer's ranks each hold a slice of their optimizer instance instead:
  `reduce_grad_norm(shard_group=...)` sums over the instance, whose copies elsewhere are not
  counted again).

Call after `sync_sequence_parallel_grads`, the DP x CP reduction and the tied-embedding sync.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from torch.distributed import ProcessGroup

from .comm import group_size
from .mesh import ParallelMesh


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    return torch.stack(norms).square().sum()


def global_grad_norm(params: Iterable[torch.Tensor], mesh: ParallelMesh) -> float:
    """L2 norm of all gradients of the whole model (same value on every rank)."""
    sharded, replicated = [], []
    for p in params:
        if p.grad is None:
            continue
        if getattr(p, "tensor_parallel_dim", None) is not None and mesh.tp_size > 1:
            sharded.append(p.grad.detach())
        else:
            replicated.append(p.grad.detach())
    return reduce_grad_norm(sharded, replicated, mesh)


def reduce_grad_norm(sharded: list[torch.Tensor], replicated: list[torch.Tensor],
                     mesh: ParallelMesh, shard_group: ProcessGroup | None = None) -> float:
    """The global norm from this rank's gradients of TP-sharded and TP-replicated parameters.
    `shard_group`: the ranks that each hold a different part of the gradients (the distributed
    optimizer's owned slices in one instance), so the squares are summed over it too."""
    device = mesh.device
    total = _sum_of_squares(sharded, device)
    if mesh.tp_rank == 0:
        total = total + _sum_of_squares(replicated, device)
    groups = (mesh.tp_group, mesh.pp_group, shard_group)
    for group in groups:
        if group_size(group) > 1:
            dist.all_reduce(total, group=group)
    return math.sqrt(float(total))


def clip_grads_(params: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale every gradient by max_norm / total_norm when the norm exceeds max_norm (pass every
    parameter, tied copies included, so the copies stay equal)."""
    if not (max_norm > 0) or not math.isfinite(total_norm):
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef >= 1.0:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef)


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, mesh: ParallelMesh, *,
                    exclude: Iterable[torch.Tensor] = ()) -> float:
    """Global norm over `params` minus `exclude` (tied copies), then clip all `params` by it.
    Returns the norm before clipping (inf/nan when a gradient overflowed; nothing is clipped
    then, so the caller can skip the step)."""
    params = list(params)
    skip = {id(p) for p in exclude}
    norm = global_grad_norm((p for p in params if id(p) not in skip), mesh)
    if max_norm > 0:
        clip_grads_(params, max_norm, norm)
    return norm
