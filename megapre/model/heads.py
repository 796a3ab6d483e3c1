"""Task heads for fine-tuning: one vector per sequence -> dropout -> linear -> logits [b, C].

    BERT  pooled [CLS]: tanh(dense(h[0])), the pretrained pooler (`heads.pooler`, the sentence-order
          head's) when the checkpoint has one
    GPT   the hidden state of the last non-padding token (`pooling="last"`: causal attention has
          read the whole text there) or the mean over the real tokens (`pooling="mean"`)

A head is tiny (hidden x classes), so it is replicated over TP and lives on the last pipeline
stage, after the final norm. It reads the full sequence: under sequence parallelism the stage's
[s/tp, b, h] slice is gathered first. `num_classes == 1` is regression (one output, MSE loss).
Parameter names (`heads.pooler.*`, `heads.classifier.*`) are the checkpoint's: the pooler's name is
the pretrained BERT's, so it loads from a pretraining checkpoint as is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megapre.errors import ConfigError
from megapre.parallel.comm import gather_from_sp
from megapre.parallel.mesh import ParallelMesh

from . import init

POOLINGS = ("cls", "last", "mean")


@dataclass(frozen=True)
class HeadConfig:
    num_classes: int  # 1 = regression
    pooling: str  # cls (BERT) | last | mean
    dropout: float = 0.1
    pooler: bool = False  # BERT's tanh dense over the pooled vector

    def validate(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"--num-classes {self.num_classes} must be >= 1 (1 = regression)")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling {self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--classifier-dropout {self.dropout} must be in [0, 1)")


def _linear(h_in: int, h_out: int, mesh: ParallelMesh, seed: int, name: str, std: float
            ) -> nn.Linear:
    lin = nn.Linear(h_in, h_out, device=mesh.device)
    init.fill_normal_(lin.weight, seed, f"{name}.weight", std)
    nn.init.zeros_(lin.bias)
    return lin


class ClassificationHead(nn.Module):
    def __init__(self, cfg: HeadConfig, hidden_size: int, mesh: ParallelMesh, seed: int,
                 init_std: float) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.mesh = cfg, mesh
        self.pooler = (_linear(hidden_size, hidden_size, mesh, seed, "heads.pooler", init_std)
                       if cfg.pooler else None)
        self.classifier = _linear(hidden_size, cfg.num_classes, mesh, seed, "heads.classifier",
                                  init_std)

    def pool(self, h: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """h [s, b, hidden] (full sequence) -> [b, hidden]. `lengths` [b]: real tokens per
        sample (padding is on the right); None = no padding."""
        s, b = h.shape[:2]
        if self.cfg.pooling == "cls":
            return h[0]
        if lengths is None:
            lengths = torch.full((b,), s, dtype=torch.long, device=h.device)
        lengths = lengths.to(h.device)
        if self.cfg.pooling == "last":
            return h[lengths - 1, torch.arange(b, device=h.device)]
        real = torch.arange(s, device=h.device)[:, None] < lengths[None, :]  # [s, b]
        total = (h * real.unsqueeze(-1).to(h.dtype)).sum(0)
        return total / lengths.clamp(min=1).unsqueeze(-1).to(h.dtype)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """h [s(/tp), b, hidden] after the final norm -> logits [b, num_classes] in fp32."""
        if self.mesh.sequence_parallel:
            h = gather_from_sp(h, self.mesh.tp_group, 0, grad_is_partial=False)
        pooled = self.pool(h, lengths)
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(pooled))
        pooled = F.dropout(pooled, self.cfg.dropout, training=self.training)
        return self.classifier(pooled).float()
