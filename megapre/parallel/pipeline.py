"""Pipeline parallelism: which layers each rank holds, and the schedule that runs micro-batches
through them (torch.distributed.pipelining's GPipe, 1F1B and interleaved 1F1B; they run on gloo).

The model is cut into `pp x virtual` chunks of layer ranges (equal, unless Megatron's uneven split
options say otherwise: megapre.parallel.layout.chunk_ranges). Chunk c of pipeline rank p runs
virtual stage `c * pp + p` (Megatron's interleaving): with PP 2 x 2 virtual stages and 8 layers,
rank 0 holds layers 0-1 and 4-5, rank 1 holds 2-3 and 6-7, so a micro-batch crosses the ranks
twice and the pipeline bubble shrinks by the number of chunks. Virtual stage 0 owns the
embedding, the last one the output head and the loss.

This module knows nothing about GPT or BERT: it takes ready chunk modules whose forward maps plain
tensors to plain tensors (hidden states [s, b, h] between stages) plus example tensors that fix the
shapes sent between stages, so the schedule never runs a shape-probing forward (which would run the
tensor-parallel collectives on empty tensors and advance the dropout RNG).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .layout import EVEN, StageSplit, check_schedule, chunk_ranges
from .mesh import ParallelMesh


@dataclass(frozen=True)
class ChunkSpec:
    """One model chunk on this rank: virtual stage `stage_index` of `num_stages`, holding layers
    [first_layer, last_layer)."""

    stage_index: int
    num_stages: int
    first_layer: int
    last_layer: int

    @classmethod
    def whole(cls, num_layers: int) -> "ChunkSpec":
        """The whole model as one chunk (no pipeline parallelism)."""
        return cls(0, 1, 0, num_layers)

    @property
    def is_first(self) -> bool:
        """Holds the embedding."""
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        """Holds the final norm, the output head and the loss."""
        return self.stage_index == self.num_stages - 1


def local_chunks(num_layers: int, pp_size: int, pp_rank: int, virtual: int | None = None,
                 split: StageSplit = EVEN) -> list[ChunkSpec]:
    """The chunks pipeline rank `pp_rank` holds, in execution order (chunk 0 first)."""
    v = virtual or 1
    ranges = chunk_ranges(num_layers, pp_size, virtual, split)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} outside [0, {pp_size})")
    return [ChunkSpec(c * pp_size + pp_rank, pp_size * v, first, last)
            for c, (first, last) in enumerate(ranges[pp_rank])]


LossFn = Callable[..., torch.Tensor]


class PipelineRunner:
    """This rank's chunks joined into one pipeline schedule.

    `modules[i]` runs `chunks[i]` (possibly wrapped in DDP: the stages then reduce gradients only
    after the last micro-batch). `first_input` is an example of the first chunk's positional input
    (one micro-batch), `hidden` of what flows between chunks, `last_output` of the last chunk's
    output (fed to `loss_fn(output, target)`). The schedule does not rescale
    gradients: `loss_fn` returns each micro-batch's share of the global-batch loss, so summed
    gradients are exactly those of gradient accumulation without a pipeline.
    """

    def __init__(self, modules: Sequence[nn.Module], chunks: Sequence[ChunkSpec],
                 mesh: ParallelMesh, schedule: str, num_microbatches: int, loss_fn: LossFn,
                 first_input: tuple[torch.Tensor, ...], hidden: torch.Tensor,
                 last_output: tuple[torch.Tensor, ...]) -> None:
        from torch.distributed import pipelining as pp

        check_schedule(schedule, mesh.pp_size, mesh.virtual_pipeline, num_microbatches)
        if len(modules) != len(chunks):
            raise ValueError(f"{len(modules)} modules for {len(chunks)} pipeline chunks")
        self.mesh = mesh
        self.num_microbatches = num_microbatches
        self.stages = [
            pp.PipelineStage(module, c.stage_index, c.num_stages, mesh.device,
                             input_args=first_input if c.is_first else (hidden,),
                             output_args=last_output if c.is_last else (hidden,),
                             group=mesh.pp_group)
            for module, c in zip(modules, chunks)]
        self.has_last = any(c.is_last for c in chunks)
        if schedule == "interleaved-1f1b":
            self.schedule = pp.ScheduleInterleaved1F1B(self.stages, num_microbatches,
                                                       loss_fn=loss_fn, scale_grads=False)
        else:
            cls = pp.ScheduleGPipe if schedule == "gpipe" else pp.Schedule1F1B
            self.schedule = cls(self.stages[0], num_microbatches, loss_fn=loss_fn,
                                scale_grads=False)

    def run(self, first_args: list[tuple], kwargs: list[dict[str, Any]], targets: list[Any]
            ) -> list[torch.Tensor]:
        """Forward and backward of all micro-batches. Returns the per-micro-batch losses on the
        rank that holds the last stage, [] elsewhere. Every rank passes its own copy of the
        micro-batches (only the stages that need an input read it)."""
        losses: list[torch.Tensor] = []
        self.schedule.step(arg_mbs=list(first_args), kwarg_mbs=list(kwargs),
                           target_mbs=list(targets), losses=losses, return_outputs=False)
        return losses if self.has_last else []

    def evaluate(self, first_args: list[tuple], kwargs: list[dict[str, Any]],
                 targets: list[Any]) -> list[torch.Tensor]:
        """Forward only (no activations kept for backward); losses as in `run`."""
        losses: list[torch.Tensor] = []
        with torch.no_grad():
            self.schedule.eval(arg_mbs=list(first_args), kwarg_mbs=list(kwargs),
                               target_mbs=list(targets), losses=losses)
        return losses if self.has_last else []


def sync_tied_embedding_grads(weight: torch.Tensor | None, mesh: ParallelMesh) -> None:
    """Sum the word-embedding gradient of the first stage with its copy's on the last stage.

    The two copies start equal (same initializer) and, receiving the same summed gradient and
    the same optimizer update, stay equal. No-op without pipeline parallelism or on middle stages.
    """
    if mesh.pp_size == 1 or weight is None or not mesh.in_embedding_group:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=mesh.embedding_group)
