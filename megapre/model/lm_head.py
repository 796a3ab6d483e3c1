"""Output side: logits against the (tied) vocab-parallel word table and the vocab-parallel loss.
Logits stay sharded over TP ([s, b, vocab/tp]); only generation gathers them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megapre.parallel.comm import copy_to_tp, gather_from_sp, gather_from_tp
from megapre.parallel.cross_entropy import vocab_parallel_cross_entropy
from megapre.parallel.mesh import ParallelMesh


def parallel_logits(h: torch.Tensor, weight: torch.Tensor, mesh: ParallelMesh,
                    bias: torch.Tensor | None = None, where: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """[s(/tp), b, h] x this rank's vocab rows [vocab/tp, h] -> [s, b, vocab/tp], or [n, vocab/tp]
    for the n positions where `where` [s, b] is True (the same mask on every TP rank)."""
    if mesh.sequence_parallel:
        h = gather_from_sp(h, mesh.tp_group, 0, grad_is_partial=True)
    else:
        h = copy_to_tp(h, mesh.tp_group)
    return F.linear(h if where is None else h[where], weight, bias)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, mesh: ParallelMesh, vocab_size: int,
               label_smoothing: float = 0.0, ignore_index: int | None = None) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) of sharded logits [s, b, vocab/tp] and labels [b, s]."""
    padded = logits.shape[-1] * mesh.tp_size
    loss = vocab_parallel_cross_entropy(logits, labels.t(), mesh.tp_group, vocab_size=vocab_size,
                                        padded_vocab_size=padded, label_smoothing=label_smoothing,
                                        ignore_index=ignore_index)
    return loss.t()


def full_logits(logits: torch.Tensor, mesh: ParallelMesh, vocab_size: int) -> torch.Tensor:
    """Gathered logits [b, s, vocab] without the padding columns (generation, evaluation)."""
    return gather_from_tp(logits, mesh.tp_group)[..., :vocab_size].transpose(0, 1)
