"""Input side of the model: vocab-parallel word embeddings + learned positions (+ BERT's token
types), a norm with --post-layernorm (the original BERT's: its blocks end, not start, with one),
then dropout; the output of this module is the residual stream [s, b, h] (or this rank's
[s/tp, b, h] slice under sequence parallelism).

With --embedding-size E (ALBERT's factorized embedding) the word, position and token-type tables
are [*, E] and their sum is projected up to hidden by a replicated linear (`project`), before
the sequence is scattered: every TP rank then sees the whole sequence, so its grads are the same
on every rank and need no reduction."""
from __future__ import annotations

import torch
from torch import nn

from megapre.ops import export_mode
from megapre.parallel.comm import scatter_to_sp
from megapre.parallel.layers import VocabParallelEmbedding
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.random import RNGTracker

from . import init
from .config import TransformerConfig
from .transformer import Dropout, make_norm


def word_embedding(cfg: TransformerConfig, mesh: ParallelMesh, seed: int) -> VocabParallelEmbedding:
    """The word table, padded to the TP-divisible vocabulary. Built from the same generator on the
    first and the last pipeline stage, so a tied output layer starts as an exact copy."""
    return VocabParallelEmbedding(cfg.padded_vocab_size(mesh.tp_size), cfg.embedding_dim, mesh,
                                  init_method=init.normal(seed, "embedding.word.weight",
                                                          cfg.init_method_std))


def replicated_linear(h_in: int, h_out: int, mesh: ParallelMesh, seed: int, name: str,
                      std: float, bias: bool = True) -> nn.Linear:
    """A linear layer kept whole on every TP rank, its weight drawn from generator `name`."""
    lin = nn.Linear(h_in, h_out, bias=bias, device=mesh.device)
    init.fill_normal_(lin.weight, seed, f"{name}.weight", std)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class Embedding(nn.Module):
    def __init__(self, cfg: TransformerConfig, mesh: ParallelMesh, seed: int,
                 tracker: RNGTracker | None, num_tokentypes: int = 0) -> None:
        super().__init__()
        self.mesh = mesh
        self.word = word_embedding(cfg, mesh, seed)
        std = cfg.init_method_std
        self.position = None
        if cfg.position_embedding_type == "learned_absolute":
            self.position = nn.Embedding(cfg.max_position_embeddings, cfg.embedding_dim,
                                         device=mesh.device)
            init.fill_normal_(self.position.weight, seed, "embedding.position.weight", std)
        self.tokentype = None
        if num_tokentypes:
            self.tokentype = nn.Embedding(num_tokentypes, cfg.embedding_dim, device=mesh.device)
            init.fill_normal_(self.tokentype.weight, seed, "embedding.tokentype.weight", std)
        self.project = None
        if cfg.factorized_embedding:
            self.project = replicated_linear(cfg.embedding_dim, cfg.hidden_size, mesh, seed,
                                             "embedding.project", std, cfg.add_bias_linear)
        self.max_positions = cfg.max_position_embeddings
        self.norm = make_norm(cfg, mesh) if cfg.post_layernorm else None
        self.dropout = Dropout(cfg.hidden_dropout, mesh, tracker)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                tokentype_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, position_ids, tokentype_ids: [b, s]. Returns [s(/tp), b, h]."""
        x = self.word(input_ids.t())
        if self.position is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            if not export_mode.active() and int(position_ids.max()) >= self.max_positions:
                raise ValueError(f"position id {int(position_ids.max())} >= "
                                 f"--max-position-embeddings={self.max_positions}")
            x = x + self.position(position_ids.t())
        if self.tokentype is not None:
            if tokentype_ids is None:
                tokentype_ids = torch.zeros_like(input_ids)
            x = x + self.tokentype(tokentype_ids.t())
        if self.project is not None:
            x = self.project(x)
        if self.mesh.sequence_parallel:
            x = scatter_to_sp(x, self.mesh.tp_group, 0)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)
