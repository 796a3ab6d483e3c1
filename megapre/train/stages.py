"""GPT and BERT as pipeline chunks: tensor-in / tensor-out modules, their losses, and how a
micro-batch dict feeds them.

A chunk's forward takes the first positional input (token ids on the first chunk, hidden states
[s(/tp), b, h] elsewhere) plus the micro-batch's other fields as keywords (every chunk receives
them; each uses what it needs: positions and masks in every layer, labels on the last chunk).
The last chunk returns per-token losses; the loss function turns them into this micro-batch's
share of the global-batch mean:

    GPT   sum(token_loss * loss_mask) / (loss-mask sum over the global batch)
    BERT  same for the masked-LM tokens + sum(sentence-order CE) / (samples in the global batch)

so summing micro-batches (and DP ranks) gives the global mean in every layout.

Micro-batch fields (the names of megapre.data's samples, batched along dim 0):
    GPT   tokens, labels [b, s] int; loss_mask [b, s] float; position_ids [b, s] (optional);
          attention_mask [b, 1, s, s] bool, True = masked (optional)
    BERT  text, types, labels (-1 = not predicted), loss_mask, padding_mask (1 = real token)
          [b, s] int; is_random [b] int (sentence-order label)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megapre.model.bert import BertModel
from megapre.model.config import TransformerConfig
from megapre.model.gpt import GPTModel, StageLayout
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.pipeline import ChunkSpec, local_chunks
from megapre.parallel.random import RNGTracker

MODEL_KINDS = ("gpt", "bert")


PIPE_DTYPE = torch.float32  # hidden states between stages (the fp32 residual stream)


class GPTChunk(nn.Module):
    """One pipeline chunk of GPT: token ids or hidden states in; hidden states or per-token
    loss [b, s] out. Hidden states leave in PIPE_DTYPE whatever autocast did inside, because
    the receiving stage's buffer was sized for it."""

    def __init__(self, model: GPTModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        first = self.model.stage.pre_process
        labels = labels if self.model.stage.post_process else None
        out = self.model(input_ids=x if first else None, position_ids=position_ids,
                         labels=labels, attention_mask=attention_mask,
                         hidden_states=None if first else x)
        return out if self.model.stage.post_process else out.to(PIPE_DTYPE)


class BertChunk(nn.Module):
    """One pipeline chunk of BERT: last chunk returns (masked-LM loss [b, s], binary logits
    [b, 2]) or just the masked-LM loss without the binary head."""

    def __init__(self, model: BertModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, types: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        first, last = self.model.stage.pre_process, self.model.stage.post_process
        pad = None if padding_mask is None else padding_mask == 0  # model: True = padding
        out = self.model(input_ids=x if first else None, tokentype_ids=types if first else None,
                         padding_mask=pad, lm_labels=labels.clamp(min=0) if last else None,
                         hidden_states=None if first else x)
        if not last:
            return out.to(PIPE_DTYPE)
        lm, binary = out
        return lm if binary is None else (lm, binary)


@dataclass
class LossParts:
    """Detached per-micro-batch loss components, for logging (summed by the step)."""

    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(value.detach())

    def take(self) -> dict[str, torch.Tensor]:
        out = {k: torch.stack(v).sum() for k, v in self.parts.items()}
        self.parts.clear()
        return out


class GPTLoss:
    """loss_fn(per_token_loss, loss_mask) -> share of the global-batch mean. The global counts
    are set per batch (`counts`, so the forward-only schedule, which forwards no extra loss
    arguments, computes the same loss) or passed per call (`tokens=`, `samples=`)."""

    def __init__(self) -> None:
        self.log = LossParts()
        self.counts = {"tokens": 1.0, "samples": 1.0}

    def __call__(self, out: torch.Tensor, loss_mask: torch.Tensor, *,
                 tokens: float | None = None, samples: float | None = None) -> torch.Tensor:
        tokens = self.counts["tokens"] if tokens is None else tokens
        loss = (out.float() * loss_mask.float()).sum() / tokens
        self.log.add("lm loss", loss)
        return loss


class BertLoss(GPTLoss):
    """loss_fn((lm_loss, binary), (loss_mask, is_random)): masked-LM mean over the predicted
    tokens + sentence-order cross entropy mean over the samples."""

    def __call__(self, out, target, *, tokens: float | None = None,
                 samples: float | None = None) -> torch.Tensor:
        loss_mask, is_random = target
        tokens = self.counts["tokens"] if tokens is None else tokens
        samples = self.counts["samples"] if samples is None else samples
        lm, binary = out if isinstance(out, tuple) else (out, None)
        loss = (lm.float() * loss_mask.float()).sum() / max(tokens, 1.0)
        self.log.add("lm loss", loss)
        if binary is not None:
            sop = F.cross_entropy(binary.float(), is_random.long(), reduction="sum") / samples
            self.log.add("sop loss", sop)
            loss = loss + sop
        return loss


@dataclass
class MicroBatch:
    """A micro-batch split the way the pipeline consumes it."""

    first_args: tuple[torch.Tensor, ...]
    kwargs: dict[str, Any]
    target: Any


class ModelAdapter:
    """What the step needs to know about a model kind: how to build its chunks, how to split a
    micro-batch, which normalizers its loss needs, and the example tensors for the pipeline."""

    def __init__(self, kind: str, cfg: TransformerConfig, mesh: ParallelMesh, *,
                 add_binary_head: bool = True) -> None:
        if kind not in MODEL_KINDS:
            raise ValueError(f"--model {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        self.kind, self.cfg, self.mesh = kind, cfg, mesh
        self.add_binary_head = add_binary_head and kind == "bert"
        self.loss_fn = GPTLoss() if kind == "gpt" else BertLoss()

    # -- building --------------------------------------------------------------------------
    def chunks(self) -> list[ChunkSpec]:
        return local_chunks(self.cfg.num_layers, self.mesh.pp_size, self.mesh.pp_rank,
                            self.mesh.virtual_pipeline)

    def build(self, spec: ChunkSpec, *, seed: int, tracker: RNGTracker | None = None,
              recompute_granularity: str | None = None, label_smoothing: float = 0.0
              ) -> nn.Module:
        layout = StageLayout(spec.first_layer, spec.last_layer, spec.is_first, spec.is_last)
        if self.kind == "gpt":
            return GPTChunk(GPTModel(self.cfg, self.mesh, seed=seed, tracker=tracker,
                                     stage=layout, recompute_granularity=recompute_granularity,
                                     label_smoothing=label_smoothing))
        if label_smoothing:
            raise ValueError("--label-smoothing is only supported for GPT")
        return BertChunk(BertModel(self.cfg, self.mesh, seed=seed, tracker=tracker, stage=layout,
                                   add_binary_head=self.add_binary_head,
                                   recompute_granularity=recompute_granularity))

    # -- data ------------------------------------------------------------------------------
    def split(self, mb: dict[str, torch.Tensor]) -> MicroBatch:
        dev = self.mesh.device
        mb = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
        if self.kind == "gpt":
            _require(mb, ("tokens", "labels", "loss_mask"), "GPT")
            kwargs = {"labels": mb["labels"]}
            for name in ("position_ids", "attention_mask"):
                if mb.get(name) is not None:
                    kwargs[name] = mb[name]
            return MicroBatch((mb["tokens"],), kwargs, mb["loss_mask"])
        _require(mb, ("text", "types", "labels", "loss_mask", "padding_mask", "is_random"), "BERT")
        kwargs = {"types": mb["types"], "padding_mask": mb["padding_mask"],
                  "labels": mb["labels"]}
        return MicroBatch((mb["text"],), kwargs, (mb["loss_mask"], mb["is_random"].reshape(-1)))

    def local_counts(self, mbs: list[MicroBatch]) -> torch.Tensor:
        """[loss tokens, samples] of this rank's micro-batches (summed over DP by the step)."""
        tokens = sum(float(self._loss_mask(m).float().sum()) for m in mbs)
        samples = sum(m.first_args[0].shape[0] for m in mbs)
        return torch.tensor([tokens, float(samples)], dtype=torch.float64)

    def _loss_mask(self, mb: MicroBatch) -> torch.Tensor:
        return mb.target if self.kind == "gpt" else mb.target[0]

    def set_counts(self, counts: torch.Tensor) -> None:
        """Global [loss tokens, samples] of the batch about to run: the loss normalizers."""
        tokens, samples = (float(c) for c in counts.cpu())
        if self.kind == "gpt" and tokens <= 0:
            raise ValueError("the global batch has no token with a non-zero loss_mask; check "
                             "the dataset's loss mask (e.g. --eod-mask-loss on data made only "
                             "of end-of-document tokens)")
        self.loss_fn.counts = {"tokens": tokens, "samples": samples}

    def loss_kwargs(self, counts: torch.Tensor) -> dict[str, float]:
        """`set_counts`, returning the normalizers as keywords for a per-call loss_fn."""
        self.set_counts(counts)
        return dict(self.loss_fn.counts)

    # -- pipeline shapes -------------------------------------------------------------------
    def examples(self, micro_batch: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor,
                                                  tuple[torch.Tensor, ...]]:
        """(first chunk input, hidden states between chunks, last chunk output) of one
        micro-batch, as tensors on the meta device (only shapes and dtypes matter)."""
        cfg, mesh = self.cfg, self.mesh
        s, b = cfg.seq_length, micro_batch
        s_local = s // mesh.tp_size if mesh.sequence_parallel else s
        meta = torch.device("meta")
        ids = torch.empty(b, s, dtype=torch.long, device=meta)
        hidden = torch.empty(s_local, b, cfg.hidden_size, dtype=PIPE_DTYPE, device=meta,
                             requires_grad=True)  # receivers send its gradient back
        lm = torch.empty(b, s, dtype=torch.float32, device=meta, requires_grad=True)
        last: tuple[torch.Tensor, ...] = (lm,)
        if self.add_binary_head:
            last = (lm, torch.empty(b, 2, dtype=torch.float32, device=meta, requires_grad=True))
        return (ids,), hidden, last


def _require(mb: dict, names: tuple[str, ...], kind: str) -> None:
    missing = [n for n in names if mb.get(n) is None]
    if missing:
        raise KeyError(f"{kind} micro-batch lacks {', '.join(missing)} (has "
                       f"{', '.join(sorted(mb))}); it needs {', '.join(names)}")
