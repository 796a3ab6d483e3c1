"""Fine-tuning chunks: GPT or BERT with a classification/regression head on the last stage
(megapre/model/heads.py), the task loss (megapre/train/losses.py `task_loss`) and how a task
micro-batch feeds them. The pretraining step, pipeline schedules and DDP run them unchanged.

Micro-batch fields (megapre/data/task_batches.py `collate`, batched along dim 0):
    tokens, types, padding_mask (1 = real token) [b, s] int; lengths [b] int (real tokens, right
    padding); labels [b] int (float for regression); weight [b] float (0 = filler sample that
    completes an evaluation's last batch)

Adaptation (`Adaptation`): full fine-tuning trains everything; `freeze_backbone` (linear probe)
trains only the head; LoRA adds low-rank adapters to the chosen layers and trains them and the
head. Freezing happens before DDP wraps a chunk, so DDP only waits for what trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megapre.model.bert import BertModel
from megapre.model.config import TransformerConfig
from megapre.model.gpt import GPTModel
from megapre.model.heads import HeadConfig
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.pipeline import ChunkSpec
from megapre.parallel.random import RNGTracker

from .losses import Normalizers, task_loss
from .stages import PIPE_DTYPE, MicroBatch, ModelAdapter, _require

TASK_FIELDS = ("tokens", "types", "padding_mask", "lengths", "labels", "weight")


@dataclass(frozen=True)
class Adaptation:
    freeze_backbone: bool = False
    lora: object | None = None  # megapre.model.lora.LoRAConfig


class TaskChunk(nn.Module):
    """One pipeline chunk of a task model: token ids or hidden states in; hidden states
    (PIPE_DTYPE) or logits [b, classes] out."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor, types: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        first, last = self.model.stage.is_first, self.model.stage.is_last
        inputs = {"input_ids": x if first else None, "hidden_states": None if first else x,
                  "lengths": lengths}
        if self.kind == "bert":
            pad = None if padding_mask is None else padding_mask == 0  # model: True = padding
            out = self.model(tokentype_ids=types if first else None, padding_mask=pad, **inputs)
        else:  # causal: right padding is never seen by a real token, so no mask is needed
            out = self.model(**inputs)
        return out if last else out.to(PIPE_DTYPE)


class TaskAdapter(ModelAdapter):
    """ModelAdapter for fine-tuning: builds task chunks, splits task micro-batches, uses
    `task_loss` normalized by the real samples of the global batch."""

    def __init__(self, kind: str, cfg: TransformerConfig, mesh: ParallelMesh, head: HeadConfig,
                 adaptation: Adaptation = Adaptation()) -> None:
        super().__init__(kind, cfg, mesh, add_binary_head=False)
        head.validate()
        self.head, self.adaptation = head, adaptation
        self.collected: list[tuple[torch.Tensor, ...]] | None = None

    def loss(self, logits: torch.Tensor, target, norm: Normalizers):
        """`task_loss`; while `collected` is a list (evaluation), also keeps each micro-batch's
        (logits, labels, weight, index) on the last stage, in micro-batch order."""
        if self.collected is not None:
            self.collected.append(tuple(t.detach().float().cpu() if t.is_floating_point()
                                        else t.detach().cpu() for t in (logits, *target)))
        return task_loss(logits, target[:2], norm)

    def part_names(self) -> set[str]:
        return {"task loss"}

    @property
    def ties_embeddings(self) -> bool:
        return False  # the head replaces the output layer

    def build(self, spec: ChunkSpec, *, seed: int, tracker: RNGTracker | None = None,
              recompute_granularity: str | None = None, label_smoothing: float = 0.0
              ) -> nn.Module:
        if label_smoothing:
            raise ValueError("--label-smoothing is not supported for fine-tuning")
        common = dict(seed=seed, tracker=tracker, stage=spec,
                      recompute_granularity=recompute_granularity, task_head=self.head)
        model = (GPTModel(self.cfg, self.mesh, **common) if self.kind == "gpt"
                 else BertModel(self.cfg, self.mesh, **common))
        self._adapt(model, seed)
        return TaskChunk(model, self.kind)

    def _adapt(self, model: nn.Module, seed: int) -> None:
        a = self.adaptation
        if a.lora is not None:
            from megapre.model.lora import apply_lora

            apply_lora(model, a.lora, self.mesh, seed)  # freezes the base weights
        if a.freeze_backbone or a.lora is not None:
            for name, p in model.named_parameters():
                if name.startswith("heads."):
                    p.requires_grad_(True)
                elif a.lora is None or ".lora_" not in name:
                    p.requires_grad_(False)

    def split(self, mb: dict[str, torch.Tensor]) -> MicroBatch:
        dev = self.mesh.device
        _require(mb, TASK_FIELDS, "task")
        mb = {k: v.to(dev, non_blocking=True) for k, v in mb.items() if torch.is_tensor(v)}
        kwargs = {"lengths": mb["lengths"]}
        if self.kind == "bert":
            kwargs.update(types=mb["types"], padding_mask=mb["padding_mask"])
        index = mb.get("index")
        if index is None:
            index = torch.full_like(mb["lengths"], -1)
        return MicroBatch((mb["tokens"],), kwargs, (mb["labels"], mb["weight"], index))

    def local_counts(self, mbs: list[MicroBatch]) -> torch.Tensor:
        """[real tokens, real samples] of this rank's micro-batches."""
        tokens = sum(float((m.kwargs["lengths"].float() * m.target[1].float()).sum())
                     for m in mbs)
        samples = sum(float(m.target[1].float().sum()) for m in mbs)
        return torch.tensor([tokens, samples], dtype=torch.float64)

    def normalizers(self, counts: torch.Tensor) -> Normalizers:
        return Normalizers.from_counts(counts, require_tokens=False)

    def examples(self, micro_batch: int):
        (ids,), hidden, _ = super().examples(micro_batch)
        logits = torch.empty(micro_batch, self.head.num_classes, dtype=torch.float32,
                             device=torch.device("meta"), requires_grad=True)
        return (ids,), hidden, (logits,)
