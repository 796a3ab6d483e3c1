"""Whole-model statistics for the logs (Megatron's --log-params-norm and
--log-num-zeros-in-grad): the same value on every rank, each element counted once however the
model is split (TP shards summed over TP, replicated tensors taken from TP rank 0, pipeline
stages summed over PP, tied copies excluded)."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from .comm import group_size
from .mesh import ParallelMesh


def _model_sum(params: Iterable[torch.Tensor], mesh: ParallelMesh, exclude: Iterable[torch.Tensor],
               value: Callable[[torch.Tensor], torch.Tensor | None]) -> float:
    skip = {id(p) for p in exclude}
    total = torch.zeros((), dtype=torch.float64, device=mesh.device)
    for p in params:
        if id(p) in skip:
            continue
        sharded = getattr(p, "tensor_parallel_dim", None) is not None and mesh.tp_size > 1
        if not sharded and mesh.tp_rank != 0:
            continue
        v = value(p)
        if v is not None:
            total += v.double()
    for group in (mesh.tp_group, mesh.pp_group):
        if group_size(group) > 1:
            dist.all_reduce(total, group=group)
    return float(total)


@torch.no_grad()
def global_param_norm(params: Iterable[torch.Tensor], mesh: ParallelMesh,
                      exclude: Iterable[torch.Tensor] = ()) -> float:
    """L2 norm of all parameters of the whole model."""
    return math.sqrt(_model_sum(params, mesh, exclude, lambda p: p.detach().float().square().sum()))


@torch.no_grad()
def global_zeros_in_grad(params: Iterable[torch.Tensor], mesh: ParallelMesh,
                         exclude: Iterable[torch.Tensor] = ()) -> int:
    """Gradient elements that are exactly zero, over the whole model (a parameter without a
    gradient counts all its elements, as Megatron's count does)."""
    def zeros(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            return torch.tensor(p.numel(), device=p.device)
        return (p.grad == 0).sum()
    return int(_model_sum(params, mesh, exclude, zeros))
