"""GPT and BERT as pipeline chunks: tensor-in / tensor-out modules, which loss each uses
(megapre/train/losses.py), and how a micro-batch dict feeds them.

A chunk's forward takes the first positional input (token ids on the first chunk, hidden states
[s(/tp), b, h] elsewhere) plus the micro-batch's other fields as keywords (every chunk receives
them; each uses what it needs: positions and masks in every layer, labels on the last chunk).
The last chunk returns per-token losses; the kind's loss turns them into this micro-batch's
share of the global-batch mean, so summing micro-batches (and DP ranks) gives the global mean in
every layout.

Micro-batch fields (the names of megapre.data's samples, batched along dim 0):
    GPT   tokens, labels [b, s] int; loss_mask [b, s] float; position_ids [b, s] (optional);
          attention_mask [b, 1, s, s] bool, True = masked (optional)
    BERT  text, types, labels (-1 = not predicted), loss_mask, padding_mask (1 = real token)
          [b, s] int; is_random [b] int (sentence-order label)

Under context parallelism every CP rank receives the whole micro-batch (the same as its DP
peers) and keeps its zig-zag share of the sequence (Megatron's get_batch_on_this_cp_rank):
GPT's tokens, labels, loss mask and positions [b, s/cp], attention-mask rows [b, 1, s/cp, s];
BERT's text, types, labels and loss mask [b, s/cp], with the padding mask whole (the keys).
Every CP rank computes BERT's sentence-order loss of the same samples, so each adds 1/CP of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megapre.model.bert import BertModel
from megapre.model.config import TransformerConfig
from megapre.model.gpt import GPTModel
from megapre.parallel.context import split_sequence
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.pipeline import ChunkSpec, local_chunks
from megapre.parallel.random import RNGTracker

from .losses import LossFn, Normalizers, bert_loss, lm_loss

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
        first = self.model.stage.is_first
        labels = labels if self.model.stage.is_last else None
        out = self.model(input_ids=x if first else None, position_ids=position_ids,
                         labels=labels, attention_mask=attention_mask,
                         hidden_states=None if first else x)
        return out if self.model.stage.is_last else out.to(PIPE_DTYPE)


class BertChunk(nn.Module):
    """One pipeline chunk of BERT: last chunk returns (masked-LM loss [b, s], binary logits
    [b, 2]) or just the masked-LM loss without the binary head."""

    def __init__(self, model: BertModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, types: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        first, last = self.model.stage.is_first, self.model.stage.is_last
        pad = None if padding_mask is None else padding_mask == 0  # model: True = padding
        out = self.model(input_ids=x if first else None, tokentype_ids=types if first else None,
                         padding_mask=pad, labels=labels.clamp(min=0) if last else None,
                         hidden_states=None if first else x,
                         predicted=labels >= 0 if last else None)
        if not last:
            return out.to(PIPE_DTYPE)
        lm, binary = out
        return lm if binary is None else (lm, binary)


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
        self._loss_fn: LossFn = lm_loss if kind == "gpt" else bert_loss

    def loss(self, output, target, norm: Normalizers):
        """This micro-batch's share of the global-batch loss (megapre/train/losses.py)."""
        if self.kind == "bert" and self.mesh.cp_size > 1:  # see the module doc
            norm = Normalizers(norm.tokens, norm.samples * self.mesh.cp_size)
        return self._loss_fn(output, target, norm)

    def part_names(self) -> set[str]:
        """The loss parts the step reports (the same on every rank)."""
        return {"lm loss", "sop loss"} if self.add_binary_head else {"lm loss"}

    def total(self, parts: dict[str, float]) -> float:
        """The step's loss from its reduced parts (their sum; distillation weights them)."""
        return sum(parts.values())

    @property
    def ties_embeddings(self) -> bool:
        """Whether an output layer on the last stage shares the first stage's word table."""
        return not self.cfg.untie_embeddings_and_output_weights

    # -- building --------------------------------------------------------------------------
    def chunks(self) -> list[ChunkSpec]:
        return local_chunks(self.cfg.num_layers, self.mesh.pp_size, self.mesh.pp_rank,
                            self.mesh.virtual_pipeline, self.mesh.stage_split)

    def build(self, spec: ChunkSpec, *, seed: int, tracker: RNGTracker | None = None,
              recompute_granularity: str | None = None, label_smoothing: float = 0.0
              ) -> nn.Module:
        if self.kind == "gpt":
            return GPTChunk(GPTModel(self.cfg, self.mesh, seed=seed, tracker=tracker,
                                     stage=spec, recompute_granularity=recompute_granularity,
                                     label_smoothing=label_smoothing))
        if label_smoothing:
            raise ValueError("--label-smoothing is only supported for GPT")
        return BertChunk(BertModel(self.cfg, self.mesh, seed=seed, tracker=tracker, stage=spec,
                                   add_binary_head=self.add_binary_head,
                                   recompute_granularity=recompute_granularity))

    # -- data ------------------------------------------------------------------------------
    def split(self, mb: dict[str, torch.Tensor]) -> MicroBatch:
        dev = self.mesh.device
        mb = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
        if self.kind == "gpt":
            _require(mb, ("tokens", "labels", "loss_mask"), "GPT")
            mb = self._context_share(mb, ("tokens", "labels", "loss_mask", "position_ids"))
            kwargs = {"labels": mb["labels"]}
            for name in ("position_ids", "attention_mask"):
                if mb.get(name) is not None:
                    kwargs[name] = mb[name]
            return MicroBatch((mb["tokens"],), kwargs, mb["loss_mask"])
        _require(mb, ("text", "types", "labels", "loss_mask", "padding_mask", "is_random"), "BERT")
        mb = self._context_share(mb, ("text", "types", "labels", "loss_mask"))
        kwargs = {"types": mb["types"], "padding_mask": mb["padding_mask"],
                  "labels": mb["labels"]}
        return MicroBatch((mb["text"],), kwargs, (mb["loss_mask"], mb["is_random"].reshape(-1)))

    def _context_share(self, mb: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        """This CP rank's zig-zag share of the fields `names` and of GPT's attention-mask rows
        (the whole micro-batch without CP)."""
        cp, rank = self.mesh.cp_size, self.mesh.cp_rank
        if cp == 1:
            return mb
        out = dict(mb)
        for name in names:
            if mb.get(name) is not None:
                out[name] = split_sequence(mb[name], 1, cp, rank)
        mask = mb.get("attention_mask")
        if mask is not None and mask.shape[2] > 1:  # rows: our queries; columns: every key
            out["attention_mask"] = split_sequence(mask, 2, cp, rank)
        return out

    def local_counts(self, mbs: list[MicroBatch]) -> torch.Tensor:
        """[loss tokens, samples] of this rank's micro-batches (summed over DP x CP by the
        step; a sample counts once, on CP rank 0, since every CP rank holds a share of it)."""
        tokens = sum(float(self._loss_mask(m).float().sum()) for m in mbs)
        samples = sum(m.first_args[0].shape[0] for m in mbs) if self.mesh.cp_rank == 0 else 0
        return torch.tensor([tokens, float(samples)], dtype=torch.float64)

    def _loss_mask(self, mb: MicroBatch) -> torch.Tensor:
        return mb.target if self.kind == "gpt" else mb.target[0]

    def normalizers(self, counts: torch.Tensor) -> Normalizers:
        """The loss normalizers of a global batch from its all-reduced [tokens, samples]."""
        return Normalizers.from_counts(counts, require_tokens=self.kind == "gpt")

    # -- pipeline shapes -------------------------------------------------------------------
    def examples(self, micro_batch: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor,
                                                  tuple[torch.Tensor, ...]]:
        """(first chunk input, hidden states between chunks, last chunk output) of one
        micro-batch, as tensors on the meta device (only shapes and dtypes matter)."""
        cfg, mesh = self.cfg, self.mesh
        s, b = cfg.seq_length // mesh.cp_size, micro_batch  # this CP rank's share
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
