"""Forward-only loss of global batches in any layout (validation, test, megapre.evaluate).

A thin face over TrainStep.evaluate: the same micro-batching, loss normalization and pipeline
schedule (forward only) as training, so a validation loss is comparable to the training loss of
the same batch.
"""
from __future__ import annotations

from typing import Iterator

import torch

from megapre.parallel.p2p import recv_tensor as _recv  # noqa: F401  (generation's stage walk)
from megapre.parallel.p2p import send_tensor as _send  # noqa: F401
from megapre.train.parallel_model import ParallelModel
from megapre.train.step import StepConfig, TrainStep


class EvalStep:
    """`evaluator(batch_iter) -> (loss, parts)` over one global batch, same on every rank."""

    def __init__(self, model: ParallelModel, config: StepConfig,
                 step: TrainStep | None = None) -> None:
        # An evaluator needs no optimizer; reuse the training step's machinery when given.
        self.step = step if step is not None else TrainStep(model, None, config)
        self.model, self.mesh = model, model.mesh

    def __call__(self, batch_iter: Iterator[dict[str, torch.Tensor]]) -> tuple[float, dict[str, float]]:
        result = dict(self.step.evaluate(batch_iter))
        loss = result.pop("loss")
        return loss, result
