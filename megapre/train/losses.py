"""Training losses as pure functions of their inputs.

Each loss takes the last pipeline stage's output for one micro-batch, that micro-batch's targets
and the global batch's normalizers, and returns `(loss, parts)`: the micro-batch's share of the
global-batch mean (so summing micro-batches and DP ranks gives the mean of one process running
the whole batch, in every layout) and its detached components for logging. Nothing is stored
between calls; scaling (fp16) and logging belong to the caller (megapre/train/step.py).

    GPT   sum(token_loss * loss_mask) / (loss-mask sum over the global batch)
    BERT  same for the masked-LM tokens + sum(sentence-order CE) / (samples in the global batch)
    task  sum(weight * CE(logits, label)) / (real samples in the global batch); regression
          (one output) uses the squared error instead. Filler samples (weight 0) that complete an
          evaluation's last batch count for nothing.
    distillation  alpha x (the LM or task share) + (1 - alpha) x T^2 x (the KL share, same mask
          and normalizer) [+ hidden weight x (the hidden-state MSE share)]; the parts are
          reported unweighted ('lm loss' stays the cross entropy) and `KDWeights.total` mixes
          them into the step's loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

Parts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Normalizers:
    """Counts of the whole global batch (all micro-batches, all DP ranks)."""

    tokens: float  # loss-mask sum
    samples: float

    @classmethod
    def from_counts(cls, counts: torch.Tensor, *, require_tokens: bool = True) -> "Normalizers":
        """From the all-reduced [tokens, samples] vector; refuses a batch with nothing to learn."""
        tokens, samples = (float(c) for c in counts.cpu())
        if require_tokens and tokens <= 0:
            raise ValueError("the global batch has no token with a non-zero loss_mask; check "
                             "the dataset's loss mask (e.g. --eod-mask-loss on data made only "
                             "of end-of-document tokens)")
        return cls(tokens, samples)


def lm_loss(token_loss: torch.Tensor, loss_mask: torch.Tensor, norm: Normalizers
            ) -> tuple[torch.Tensor, Parts]:
    """Causal-LM share: per-token loss [b, s] masked and divided by the global token count."""
    loss = (token_loss.float() * loss_mask.float()).sum() / norm.tokens
    return loss, {"lm loss": loss.detach()}


def bert_loss(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
              target: tuple[torch.Tensor, torch.Tensor], norm: Normalizers
              ) -> tuple[torch.Tensor, Parts]:
    """Masked-LM share (over predicted tokens) + sentence-order share (over samples).
    `output` is the per-token LM loss, or (per-token LM loss, binary logits [b, 2])."""
    loss_mask, is_random = target
    lm, binary = output if isinstance(output, tuple) else (output, None)
    loss = (lm.float() * loss_mask.float()).sum() / max(norm.tokens, 1.0)
    parts = {"lm loss": loss.detach()}
    if binary is not None:
        sop = F.cross_entropy(binary.float(), is_random.long(), reduction="sum") / norm.samples
        parts["sop loss"] = sop.detach()
        loss = loss + sop
    return loss, parts


def task_loss(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor],
              norm: Normalizers) -> tuple[torch.Tensor, Parts]:
    """Fine-tuning share: logits [b, classes] (classes == 1: regression), target (labels [b],
    weight [b]); divided by the real samples of the global batch (`norm.samples`)."""
    labels, weight = target
    logits = logits.float()
    if logits.shape[-1] == 1:
        per_sample = (logits[:, 0] - labels.float()) ** 2
    else:
        per_sample = F.cross_entropy(logits, labels.long(), reduction="none")
    loss = (per_sample * weight.float()).sum() / max(norm.samples, 1.0)
    return loss, {"task loss": loss.detach()}


@dataclass(frozen=True)
class KDWeights:
    """--kd-alpha, --kd-temperature, --kd-hidden-weight."""

    alpha: float
    temperature: float
    hidden: float = 0.0

    def mix(self, label_loss, kd, hidden=None):
        """alpha x label loss + (1 - alpha) x kd [+ hidden weight x hidden]: tensors or floats
        (alpha = 1 gives the label loss exactly)."""
        out = self.alpha * label_loss + (1.0 - self.alpha) * kd
        return out if hidden is None else out + self.hidden * hidden

    def total(self, parts: dict[str, float], label_part: str) -> float:
        """The step's loss from its reduced, unweighted parts."""
        return self.mix(parts[label_part], parts["kd loss"], parts.get("hidden loss"))


def distill_lm_loss(output: tuple[torch.Tensor, ...], loss_mask: torch.Tensor, norm: Normalizers,
                    w: KDWeights) -> tuple[torch.Tensor, Parts]:
    """Causal-LM distillation share: output = per-token (CE, KL[, hidden MSE]) [b, s]."""
    ce, kl, *hidden = output
    lm, parts = lm_loss(ce, loss_mask, norm)
    kd = (kl.float() * loss_mask.float()).sum() / norm.tokens * w.temperature ** 2
    parts["kd loss"] = kd.detach()
    h = None
    if hidden:
        h = (hidden[0].float() * loss_mask.float()).sum() / norm.tokens
        parts["hidden loss"] = h.detach()
    return w.mix(lm, kd, h), parts


def distill_task_loss(task: tuple[torch.Tensor, Parts], kl: torch.Tensor,
                      target: tuple[torch.Tensor, ...], norm: Normalizers, w: KDWeights
                      ) -> tuple[torch.Tensor, Parts]:
    """Fine-tuning distillation share: `task` = task_loss's (loss, parts); kl [b] per sample,
    weighted and normalized as the task loss."""
    loss, parts = task
    weight = target[1].float()
    kd = (kl.float() * weight).sum() / max(norm.samples, 1.0) * w.temperature ** 2
    parts["kd loss"] = kd.detach()
    return w.mix(loss, kd), parts


LossFn = Callable[[Any, Any, Normalizers], tuple[torch.Tensor, Parts]]
