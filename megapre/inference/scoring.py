"""Forward-only scoring of a checkpoint over many global batches, in any TP/PP/DP layout.

The batches run through the Trainer's EvalStep (same micro-batch splitting, pipeline schedule
and loss normalization as validation during training). Each batch's losses are means over its
global token (sample) count, which the step reports as its `normalizers`; multiplying back
gives sums, so the reported loss is the token-weighted mean over every batch (the exact corpus
perplexity) rather than a mean of batch means (reported too, as `batch_mean_loss`: what training's
validation prints). BERT's sentence-order accuracy comes from a forward hook on the binary head
of the last stage, matched in order with the labels of the micro-batches this rank fed.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist

from megapre.parallel.comm import group_size
from megapre.train.step import EvalStep
from megapre.train.parallel_model import ParallelModel


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


class _SentenceOrderCounter:
    """Correct sentence-order predictions of this rank's last stage: the binary head's outputs
    (forward hook) against the labels of the micro-batches, in the order they were fed."""

    def __init__(self, model: ParallelModel) -> None:
        heads = [m.heads for m in model.models if getattr(m, "heads", None) is not None
                 and m.heads.binary is not None]
        self.active = bool(heads)
        self.predictions: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self._hooks = [h.binary.register_forward_hook(self._record) for h in heads]

    def _record(self, module, inputs, output) -> None:
        self.predictions.append(output.detach().argmax(-1).cpu())

    def feed(self, batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for mb in batches:
            if self.active and "is_random" in mb:
                self.labels.append(torch.as_tensor(mb["is_random"]).reshape(-1).long().cpu())
            yield mb

    def take(self) -> tuple[float, float]:
        """(correct, predicted) since the last take; every fed micro-batch must be predicted."""
        if len(self.predictions) != len(self.labels):
            raise RuntimeError(f"sentence-order head ran {len(self.predictions)} times for "
                               f"{len(self.labels)} micro-batches; cannot match predictions "
                               "to labels")
        correct = sum(float((p == y).sum()) for p, y in zip(self.predictions, self.labels))
        count = float(sum(y.numel() for y in self.labels))
        self.predictions, self.labels = [], []
        return correct, count

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def score(model: ParallelModel, step: EvalStep, batches: Iterator[dict[str, torch.Tensor]],
          num_batches: int, global_batch_size: int,
          autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> Score:
    """Run `num_batches` global batches through `step`; the same Score on every rank."""
    sop = _SentenceOrderCounter(model)
    fed = sop.feed(batches)
    # lm_sum, tokens, sop_sum, sop_correct, sop_count
    sums = torch.zeros(5, dtype=torch.float64)
    batch_losses, parts = 0.0, {}
    t0 = time.perf_counter()
    try:
        for _ in range(num_batches):
            with autocast():
                loss, parts = step(fed)
            tokens, samples = step.normalizers.tokens, step.normalizers.samples
            batch_losses += loss
            sums[0] += parts["lm loss"] * tokens
            sums[1] += tokens
            if "sop loss" in parts:
                sums[2] += parts["sop loss"] * samples
                if sop.active:
                    sums[3:5] += torch.tensor(sop.take(), dtype=torch.float64)
    finally:
        sop.close()
    seconds = time.perf_counter() - t0
    sums[3:5] = _last_stage_sum(sums[3:5], model)
    lm_sum, tokens, sop_sum, correct, count = sums.tolist()
    if tokens <= 0:
        raise ValueError("no token of the scored batches counts towards the loss (loss mask all "
                         "zero); check --eod-mask-loss and the data")
    has_sop = "sop loss" in parts
    return Score(batches=num_batches, samples=num_batches * global_batch_size,
                 tokens=int(round(tokens)), lm_loss=lm_sum / tokens,
                 batch_mean_loss=batch_losses / max(num_batches, 1), seconds=seconds,
                 sop_loss=sop_sum / (num_batches * global_batch_size) if has_sop else None,
                 sop_accuracy=correct / count if has_sop and count else None)


def _last_stage_sum(vec: torch.Tensor, model: ParallelModel) -> torch.Tensor:
    """Counts kept by the last stage's ranks: summed over DP there, then handed to every
    pipeline rank. TP ranks hold equal counts already (same gathered logits)."""
    mesh = model.mesh
    vec = vec.to(mesh.device)
    if mesh.is_last_stage and group_size(mesh.dp_group) > 1:
        dist.all_reduce(vec, group=mesh.dp_group)
    if group_size(mesh.pp_group) > 1:
        if not mesh.is_last_stage:
            vec.zero_()
        dist.all_reduce(vec, group=mesh.pp_group)
    return vec.cpu()
