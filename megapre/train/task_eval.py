"""Evaluate a task model on a labelled file: forward passes in any layout (the training step's
forward-only path, so the pipeline schedule and micro-batching are the training run's), every
example's logits collected on the last stage, gathered over data-parallel ranks into file order,
and turned into a report (megapre/train/task_report.py) on the reporting rank.

The reporting rank is the last pipeline stage's first TP and DP rank (it holds the logits);
other ranks get None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megapre.data.task_batches import BatchPlan, TaskBatches
from megapre.data.tasks import EncodedTask, LabelSet
from megapre.parallel.comm import group_size

from .parallel_model import ParallelModel
from .step import TrainStep
from .task_report import classification_report, regression_report


@dataclass
class Predictions:
    logits: np.ndarray  # [n, classes] in example order
    labels: np.ndarray

    def predicted(self, regression: bool) -> np.ndarray:
        return self.logits[:, 0] if regression else self.logits.argmax(1)

    def probabilities(self) -> np.ndarray:
        z = self.logits.astype(np.float64)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)


def is_reporting_rank(model: ParallelModel) -> bool:
    m = model.mesh
    return m.is_last_stage and m.tp_rank == 0 and m.dp_rank == 0


def predict(model: ParallelModel, step: TrainStep, data: EncodedTask, plan: BatchPlan,
            pad_id: int, autocast: Any) -> Predictions | None:
    """Logits of every example of `data` (reporting rank; None elsewhere). Collective."""
    batches = TaskBatches(data, plan, pad_id)
    adapter = model.adapter
    adapter.collected = []
    try:
        it = batches.evaluate()
        with autocast():
            for _ in range(batches.eval_steps()):
                step.evaluate(it)
        mine = adapter.collected
    finally:
        adapter.collected = None
    if not model.mesh.is_last_stage:
        return None
    rows = _gather_dp(mine, model)
    if rows is None:
        return None
    logits, labels, weight, index = (torch.cat(parts) for parts in zip(*rows))
    real = weight > 0
    order = torch.argsort(index[real])
    out = Predictions(logits[real][order].numpy(), labels[real][order].numpy())
    if len(out.logits) != len(data):
        raise RuntimeError(f"evaluation returned {len(out.logits)} predictions for "
                           f"{len(data)} examples")
    return out


def _gather_dp(mine: list, model: ParallelModel) -> list | None:
    """Every DP rank's collected micro-batches on the reporting rank (last stage, TP rank 0)."""
    m = model.mesh
    if m.tp_rank != 0:
        return None
    if group_size(m.dp_group) == 1:
        return mine
    parts: list[Any] = [None] * m.dp_size
    dist.all_gather_object(parts, mine, group=m.dp_group)
    return [row for part in parts for row in part] if m.dp_rank == 0 else None


def report(pred: Predictions, labels: LabelSet) -> dict:
    """Accuracy / F1 / confusion matrix (classification) or MSE / correlations (regression),
    with the mean loss over the examples."""
    if labels.regression:
        guess = pred.logits[:, 0]
        loss = float(np.mean((guess - pred.labels) ** 2))
        return regression_report(pred.labels, guess, loss=loss)
    probs = pred.probabilities()
    picked = probs[np.arange(len(probs)), pred.labels.astype(np.int64)]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-30, None))))
    return classification_report(pred.labels.astype(np.int64), pred.predicted(False),
                                 list(labels.names), loss=loss)
