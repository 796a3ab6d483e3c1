"""Shared pieces of the fine-tuning tests: tiny task models and deterministic labelled batches of
varied lengths (padded to the longest sample of each micro-batch, or to a fixed length as
pipeline parallelism needs)."""
from __future__ import annotations

import torch

from layout_cases import Layout, model_config
from megapre.model.heads import HeadConfig
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.train.parallel_model import ParallelModel
from megapre.train.step import StepConfig, TrainStep
from megapre.train.task_stages import Adaptation, TaskAdapter

SEQ, VOCAB, CLASSES = 12, 61, 3


def head_config(kind: str, classes: int = CLASSES) -> HeadConfig:
    return HeadConfig(num_classes=classes, pooling="cls" if kind == "bert" else "last",
                      dropout=0.0, pooler=kind == "bert")


def task_samples(step: int, size: int, classes: int = CLASSES, seq: int = SEQ) -> list[dict]:
    g = torch.Generator().manual_seed(500 + step)
    lengths = torch.randint(3, seq + 1, (size,), generator=g)
    labels = torch.randint(0, classes, (size,), generator=g)
    out = []
    for n, y in zip(lengths.tolist(), labels.tolist()):
        out.append({"tokens": torch.randint(1, VOCAB, (n,), generator=g),
                    "label": float(y) if classes == 1 else y})
    return out


def collate(samples: list[dict], pad_to: int | None = None, multiple: int = 1
            ) -> dict[str, torch.Tensor]:
    width = pad_to or -(-max(len(s["tokens"]) for s in samples) // multiple) * multiple
    b = len(samples)
    tokens = torch.zeros(b, width, dtype=torch.long)
    real = torch.zeros(b, width, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, :len(s["tokens"])] = s["tokens"]
        real[i, :len(s["tokens"])] = 1
    lengths = real.sum(1)
    types = ((torch.arange(width)[None] >= (lengths[:, None] // 2)).long() * real)
    labels = torch.tensor([s["label"] for s in samples])
    return {"tokens": tokens, "types": types, "padding_mask": real, "lengths": lengths,
            "labels": labels, "weight": torch.ones(b)}


def micro_batches(step: int, global_size: int, micro: int, dp_rank: int, dp: int,
                  pad_to: int | None = None, classes: int = CLASSES, multiple: int = 1
                  ) -> list[dict]:
    samples = task_samples(step, global_size, classes)
    per = global_size // dp
    mine = samples[dp_rank * per:(dp_rank + 1) * per]
    return [collate(mine[i:i + micro], pad_to, multiple) for i in range(0, per, micro)]


def build(kind: str, mesh: ParallelMesh, classes: int = CLASSES,
          adaptation: Adaptation = Adaptation()) -> ParallelModel:
    cfg = model_config(seq=SEQ)
    return ParallelModel.from_adapter(TaskAdapter(kind, cfg, mesh, head_config(kind, classes),
                                                  adaptation), seed=5)


def train(kind: str, mesh: ParallelMesh, steps: int, micro: int, global_size: int,
          classes: int = CLASSES, adaptation: Adaptation = Adaptation()) -> list[tuple[float, float]]:
    """(loss, grad norm) per step, then a forward-only loss on held-out batches."""
    model = build(kind, mesh, classes, adaptation)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step = TrainStep(model, opt, StepConfig(micro, global_size))
    pad_to = SEQ if mesh.pp_size > 1 else None
    multiple = mesh.tp_size if mesh.sequence_parallel else 1  # the sequence is split over TP
    out = []
    for it in range(steps):
        result = step(iter(micro_batches(it % 3, global_size, micro, mesh.dp_rank, mesh.dp_size,
                                         pad_to, classes, multiple)))
        out.append((result.loss, result.grad_norm))
    held = micro_batches(99, global_size, micro, mesh.dp_rank, mesh.dp_size, pad_to, classes,
                         multiple)
    out.append((step.evaluate(iter(held))["loss"], 0.0))
    return out


def layout_worker(rank: int, world: int, layout: Layout, kinds: tuple[str, ...], steps: int,
                  micro: int, global_size: int, classes: int = CLASSES):
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=layout.tp,
                                            pipeline_parallel=layout.pp,
                                            sequence_parallel=layout.sp), device="cpu")
    return {k: train(k, mesh, steps, micro, global_size, classes) for k in kinds}
