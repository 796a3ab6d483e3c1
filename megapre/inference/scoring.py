"""Forward-only scoring of a checkpoint over many global batches, in any TP/PP/DP layout.

The batches run through the Trainer's EvalStep (same micro-batch splitting, pipeline stage walk
and loss normalization as validation during training). While it runs, an observer on the loss
function adds up the raw sums on the last pipeline stage — per-token losses and loss-mask tokens,
and for BERT the sentence-order cross entropy and correct predictions — so the reported loss is
the token-weighted mean over every batch (the exact corpus perplexity), not a mean of batch
means; the latter is reported too (`batch_mean_loss`, what training's validation prints).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megapre.parallel.comm import group_size
from megapre.train.evaluate import EvalStep
from megapre.train.parallel_model import ParallelModel

SUMS = ("lm_loss_sum", "tokens", "sop_loss_sum", "sop_correct", "sop_samples")


class _SumObserver:
    """Calls the real loss function and keeps float64 sums of what it saw."""

    def __init__(self, inner) -> None:
        self.inner, self.log = inner, inner.log
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64)

    def __call__(self, out, target, **kwargs):
        loss = self.inner(out, target, **kwargs)
        with torch.no_grad():
            if isinstance(target, tuple):  # BERT: (loss_mask, is_random)
                mask, is_random = target
                lm, binary = out if isinstance(out, tuple) else (out, None)
            else:
                mask, is_random, lm, binary = target, None, out, None
            mask = mask.double()
            self.sums[0] += float((lm.double() * mask).sum())
            self.sums[1] += float(mask.sum())
            if binary is not None:
                labels = is_random.long().reshape(-1)
                self.sums[2] += float(F.cross_entropy(binary.double(), labels, reduction="sum"))
                self.sums[3] += float((binary.argmax(-1) == labels).sum())
                self.sums[4] += float(labels.numel())
        return loss


@contextlib.contextmanager
def _observe(model: ParallelModel):
    adapter = model.adapter
    observer = _SumObserver(adapter.loss_fn)
    adapter.loss_fn = observer
    try:
        yield observer
    finally:
        adapter.loss_fn = observer.inner


@dataclass
class Score:
    batches: int
    samples: int
    tokens: int
    lm_loss: float
    batch_mean_loss: float
    seconds: float
    sop_loss: float | None = None
    sop_accuracy: float | None = None

    @property
    def loss(self) -> float:
        """What training calls the loss: masked-LM (+ sentence-order for BERT)."""
        return self.lm_loss + (self.sop_loss or 0.0)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.lm_loss, 700.0))

    def as_dict(self) -> dict:
        out = {"loss": self.loss, "ppl": self.ppl, "lm_loss": self.lm_loss,
               "tokens": self.tokens, "samples": self.samples, "batches": self.batches,
               "batch_mean_loss": self.batch_mean_loss, "seconds": self.seconds,
               "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None}
        if self.sop_loss is not None:
            out.update(sop_loss=self.sop_loss, sop_accuracy=self.sop_accuracy)
        return out


def score(step: EvalStep, batches: Iterator[dict[str, torch.Tensor]], num_batches: int,
          global_batch_size: int, autocast=contextlib.nullcontext) -> Score:
    """Run `num_batches` global batches; the same Score on every rank."""
    model = step.model
    t0 = time.perf_counter()
    batch_losses = 0.0
    with _observe(model) as observer:
        for _ in range(num_batches):
            with autocast():
                loss, _ = step(batches)
            batch_losses += loss
    sums = _reduce(observer.sums, model)
    named = dict(zip(SUMS, sums.tolist()))
    tokens = named["tokens"]
    if tokens <= 0:
        raise ValueError("no token of the scored batches counts towards the loss (loss mask all "
                         "zero); check --eod-mask-loss and the data")
    sop = named["sop_samples"]
    return Score(batches=num_batches, samples=num_batches * global_batch_size,
                 tokens=int(round(tokens)), lm_loss=named["lm_loss_sum"] / tokens,
                 batch_mean_loss=batch_losses / max(num_batches, 1),
                 seconds=time.perf_counter() - t0,
                 sop_loss=named["sop_loss_sum"] / sop if sop else None,
                 sop_accuracy=named["sop_correct"] / sop if sop else None)


def _reduce(sums: torch.Tensor, model: ParallelModel) -> torch.Tensor:
    """Sum over DP on the last stage, then hand the last stage's sums to every pipeline rank.
    TP ranks hold equal sums already (the vocab-parallel loss is reduced over TP)."""
    mesh = model.mesh
    vec = sums.to(mesh.device)
    if mesh.is_last_stage and group_size(mesh.dp_group) > 1:
        dist.all_reduce(vec, group=mesh.dp_group)
    if group_size(mesh.pp_group) > 1:
        if not mesh.is_last_stage:
            vec.zero_()
        dist.all_reduce(vec, group=mesh.pp_group)
    return vec.cpu()
