"""Forward-only loss of global batches in any layout (validation, test, megapre.evaluate).

Without a pipeline each micro-batch runs through the single chunk. With one, micro-batches walk
the virtual stages in order (stage s lives on pipeline rank s % pp), passing hidden states by
point-to-point messages: sequential rather than pipelined, which is fine for the few batches an
evaluation runs, and needs nothing from the training schedules. Loss normalization is the
training step's, so a validation loss is comparable to the training loss of the same batch.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megapre.parallel.comm import group_size
from megapre.train.parallel_model import ParallelModel
from megapre.train.step import StepConfig, TrainStep

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class EvalStep:
    """`evaluator(batch_iter) -> (loss, parts)` over one global batch, same on every rank."""

    def __init__(self, model: ParallelModel, config: StepConfig) -> None:
        # Reuse the training step's batch splitting, normalization and loss reduction.
        self._step = TrainStep.__new__(TrainStep)
        self._step.model, self._step.config, self._step.mesh = model, config, model.mesh
        self._step.adapter = model.adapter
        self._step.num_microbatches = config.num_microbatches(model.mesh.dp_size)
        self.model, self.mesh, self.adapter = model, model.mesh, model.adapter

    @torch.no_grad()
    def __call__(self, batch_iter: Iterator[dict[str, torch.Tensor]]) -> tuple[float, dict[str, float]]:
        mbs = self._step._take(batch_iter)
        counts = self.adapter.local_counts(mbs)
        if group_size(self.mesh.dp_group) > 1:
            dist.all_reduce(counts, group=self.mesh.dp_group)
        loss_kwargs = self.adapter.loss_kwargs(counts)
        for chunk in self.model.chunks:
            chunk.eval()
        try:
            for mb in mbs:
                if self.mesh.pp_size == 1:
                    out = self.model.chunks[0](*mb.first_args, **mb.kwargs)
                    self.adapter.loss_fn(out, mb.target, **loss_kwargs)
                else:
                    self._pipeline_forward(mb, loss_kwargs)
        finally:
            for chunk in self.model.chunks:
                chunk.train()
        return self._step._reduce_loss(self.adapter.loss_fn.log.take())

    def _pipeline_forward(self, mb, loss_kwargs: dict) -> None:
        pp, ranks = self.mesh.pp_size, self.mesh.pp_ranks
        by_stage = {spec.stage_index: chunk for spec, chunk in zip(self.model.specs, self.model.chunks)}
        num_stages = pp * (self.mesh.virtual_pipeline or 1)
        x = None
        for s in range(num_stages):
            if s % pp != self.mesh.pp_rank:
                continue
            chunk = by_stage[s]
            if s == 0:
                x = chunk(*mb.first_args, **mb.kwargs)
            else:
                x = chunk(_recv(ranks[(s - 1) % pp], self.mesh.device), **mb.kwargs)
            if s == num_stages - 1:
                self.adapter.loss_fn(x, mb.target, **loss_kwargs)
            else:
                _send(x, ranks[(s + 1) % pp])


def _send(x: torch.Tensor, dst: int) -> None:
    header = torch.tensor([x.dim(), _DTYPES.index(x.dtype), *x.shape], dtype=torch.long)
    dist.send(torch.tensor([header.numel()], dtype=torch.long, device=x.device), dst)
    dist.send(header.to(x.device), dst)
    dist.send(x.contiguous(), dst)


def _recv(src: int, device: torch.device) -> torch.Tensor:
    n = torch.empty(1, dtype=torch.long, device=device)
    dist.recv(n, src)
    header = torch.empty(int(n), dtype=torch.long, device=device)
    dist.recv(header, src)
    ndim, code = int(header[0]), int(header[1])
    x = torch.empty(header[2:2 + ndim].tolist(), dtype=_DTYPES[code], device=device)
    dist.recv(x, src)
    return x
