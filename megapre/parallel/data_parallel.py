"""Data parallelism over the mesh's DP x CP group (parameters are replicated over both; without
context parallelism that is the DP group): torch DDP (bucketed all-reduce overlapped with
backward), with gradient accumulation that communicates only on the last micro-batch.

The losses fed to backward are each micro-batch's share of the *global-batch* mean (normalized
by the token count of the whole batch over all DP and CP ranks), so the reduction must **sum**
gradients, not average them: a comm hook replaces DDP's default divide-by-world-size. The result
is the gradient of the global-batch mean loss, identical to one process running the whole batch.

--use-distributed-optimizer replaces DDP by distributed_optimizer.py (the model is then built
unwrapped): the same SUM, as a reduce-scatter into DP-sharded AdamW state. FSDP2 (`fully_shard`)
is not offered: see `FSDP_NOTE`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .mesh import ParallelMesh

FSDP_NOTE = (
    "FSDP2 (fully_shard) does not compose cleanly with megapre's TP and PP yet (checked on torch "
    "2.14): (1) fully_shard replaces every parameter by a new DTensor parameter, dropping the "
    "attributes the TP layers set (tensor_parallel_dim, sequence_parallel), so the "
    "sequence-parallel grad sync and the TP-aware global norm would silently miscount; (2) the "
    "gradients become DTensor shards over DP, so the SP sync, the tied-embedding all-reduce "
    "between pipeline stages and the norm (which would then also sum over DP) need a separate "
    "code path; (3) the step's losses are shares of the global-batch mean and need a DP *sum*: "
    "FSDP2's set_gradient_divide_factor(1.0) reduces with ReduceOp.PREMUL_SUM, which gloo "
    "rejects, so CPU runs would average and rescale; (4) checkpoints would need 2-D (dp, tp) "
    "placements the TP layers do not describe. DDP keeps each of these steps exact.")


def _sum_allreduce_hook(group, bucket):
    """DDP comm hook: sum a gradient bucket over the DP group (no division by its size).
    (No annotations: DDP checks them at runtime and this module defers them to strings.)"""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_data_parallel(module: nn.Module, mesh: ParallelMesh, *,
                       bucket_cap_mb: float = 25.0) -> nn.Module:
    """DDP over the DP x CP group when it has more than one rank (the module unchanged
    otherwise).

    `find_unused_parameters=False`: every parameter of a stage takes part in every step (a
    parameter that does not would hang DDP's reducer; build the model without it instead).
    Parameters are already equal on all DP ranks (layout-independent init), so DDP's initial
    broadcast only confirms it.
    """
    group = mesh.dp_cp_group
    if mesh.dp_cp_size == 1 or group is None:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module  # a frozen stage (linear probe, LoRA without layers here): nothing to reduce
    ddp = DistributedDataParallel(module, process_group=group,
                                  bucket_cap_mb=bucket_cap_mb, find_unused_parameters=False,
                                  gradient_as_bucket_view=True,
                                  device_ids=[mesh.device.index] if mesh.device.type == "cuda"
                                  else None)
    ddp.register_comm_hook(group, _sum_allreduce_hook)
    return ddp


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def maybe_no_sync(modules: Sequence[nn.Module], skip_sync: bool) -> Iterator[None]:
    """Hold back DDP's all-reduce for all `modules` while `skip_sync` (gradient accumulation:
    every micro-batch but the last)."""
    with contextlib.ExitStack() as stack:
        if skip_sync:
            for m in modules:
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        yield
