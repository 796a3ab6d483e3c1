"""Whole-model statistics for the logs (Megatron's --log-params-norm and
--log-num-zeros-in-grad): the same value on every rank, each element counted once however the
model is split (TP shards summed over TP, replicated tensors taken from TP rank 0, pipeline
stages summed over PP, tied copies excluded). Under the distributed optimizer they are taken
from its owned slices, summed over one optimizer instance: the rest of a gradient is not
reduced on this rank, and with --overlap-param-gather the rest of a parameter may not be
gathered yet when the step's statistics are logged."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from .comm import group_size
from .distributed_optimizer import DistributedOptimizer
from .mesh import ParallelMesh

Pair = tuple[torch.Tensor, torch.Tensor | None]  # (parameter, the tensor of it to measure)


def _model_sum(pairs: Iterable[Pair], mesh: ParallelMesh, exclude: Iterable[torch.Tensor],
               value: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None],
               shard_group=None) -> float:
    """Sum of `value(param, tensor)` over the model; `shard_group`: ranks that each hold a
    different slice of the tensors (summed over it too)."""
    skip = {id(p) for p in exclude}
    total = torch.zeros((), dtype=torch.float64, device=mesh.device)
    for p, t in pairs:
        if id(p) in skip:
            continue
        sharded = getattr(p, "tensor_parallel_dim", None) is not None and mesh.tp_size > 1
        if not sharded and mesh.tp_rank != 0:
            continue
        v = value(p, t)
        if v is not None:
            total += v.double()
    for group in (mesh.tp_group, mesh.pp_group, shard_group):
        if group_size(group) > 1:
            dist.all_reduce(total, group=group)
    return float(total)


def _shards_or_whole(params: Iterable[torch.Tensor], sharded: DistributedOptimizer | None,
                     grads: bool) -> tuple[list[Pair], object]:
    if sharded is not None:
        pairs = sharded.shard_grads() if grads else sharded.shard_params()
        return pairs, sharded.shard_group
    return [(p, p.grad if grads else p) for p in params], None


@torch.no_grad()
def global_param_norm(params: Iterable[torch.Tensor], mesh: ParallelMesh,
                      exclude: Iterable[torch.Tensor] = (),
                      sharded: DistributedOptimizer | None = None) -> float:
    """L2 norm of all parameters of the whole model (`sharded`: the distributed optimizer that
    holds them, whose owned slices are measured instead of `params`)."""
    pairs, group = _shards_or_whole(params, sharded, grads=False)
    return math.sqrt(_model_sum(pairs, mesh, exclude,
                                lambda p, t: t.detach().float().square().sum(), group))


@torch.no_grad()
def global_zeros_in_grad(params: Iterable[torch.Tensor], mesh: ParallelMesh,
                         exclude: Iterable[torch.Tensor] = (),
                         sharded: DistributedOptimizer | None = None) -> int:
    """Gradient elements that are exactly zero, over the whole model (a parameter without a
    gradient counts all its elements, as Megatron's count does; `sharded`: as for
    global_param_norm)."""
    def zeros(p: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        if g is None:
            return torch.tensor(p.numel(), device=p.device)
        return (g == 0).sum()
    pairs, group = _shards_or_whole(params, sharded, grads=True)
    return int(_model_sum(pairs, mesh, exclude, zeros, group))
