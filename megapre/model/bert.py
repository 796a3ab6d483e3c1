"""BERT: a bidirectional encoder with a masked-LM head (tied to the word table) and an optional
sentence-order / next-sentence head, as in Megatron's BERT (pre-LN blocks, final norm), or with
--post-layernorm as the original BERT (a norm after the embeddings, post-LN blocks, no final norm).

    input_ids, tokentype_ids [b, s], padding_mask [b, s] (True = pad)
      -> embedding (+ token types) -> layers -> final norm
      -> LM head: dense + GELU + LayerNorm -> logits vs word table + bias -> masked-LM loss [b, s]
         (training: the logits of the predicted positions only)
      -> binary head: tanh(dense(h[CLS])) -> 2 logits
    or, fine-tuning (`task_head`): -> pooled [CLS] -> classifier -> logits [b, classes]

Under context parallelism each CP rank holds a zig-zag share of the sequence (true positions
for the position table; the padding mask keeps the whole sequence's columns, for the ring's
key blocks). [CLS] is token 0, on CP rank 0: its final state is broadcast over the CP group
(backward sums the gradients back to it), so every CP rank computes the same binary logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megapre import ops
from megapre.parallel.comm import gather_from_sp
from megapre.parallel.context import ContextGroup, broadcast_from_first, zigzag_positions
from megapre.parallel.layout import check_context_parallel
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.pipeline import ChunkSpec
from megapre.parallel.random import RNGTracker

from .config import TransformerConfig
from .embedding import Embedding, replicated_linear, word_embedding
from .heads import ClassificationHead, HeadConfig
from .lm_head import parallel_logits, token_loss
from .transformer import TransformerStack, final_norm


class BertHeads(nn.Module):
    """Masked-LM head and the binary (sentence-order) head of the last stage. With
    --embedding-size E the dense layer maps hidden -> E and the norm is over E, so the logits
    are taken against the [vocab, E] word table (ALBERT's head)."""

    def __init__(self, cfg: TransformerConfig, mesh: ParallelMesh, seed: int,
                 add_binary_head: bool, prefix: str = "heads") -> None:
        super().__init__()
        std = cfg.init_method_std
        self.mesh = mesh
        self.dense = replicated_linear(cfg.hidden_size, cfg.embedding_dim, mesh, seed,
                                       f"{prefix}.dense", std)
        self.norm = ops.LayerNorm(cfg.embedding_dim, eps=cfg.layernorm_epsilon, device=mesh.device)
        for p in (*self.dense.parameters(), *self.norm.parameters()):
            p.sequence_parallel = mesh.sequence_parallel  # they see this rank's tokens only
        vocab_local = cfg.padded_vocab_size(mesh.tp_size) // mesh.tp_size
        self.bias = nn.Parameter(torch.zeros(vocab_local, device=mesh.device))
        self.bias.tensor_parallel_dim = 0
        self.pooler = self.binary = None
        if add_binary_head:
            self.pooler = replicated_linear(cfg.hidden_size, cfg.hidden_size, mesh, seed,
                                            f"{prefix}.pooler", std)
            self.binary = replicated_linear(cfg.hidden_size, 2, mesh, seed, f"{prefix}.binary",
                                            std)

    def forward(self, h: torch.Tensor, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [s(/tp), b, hidden] after the final norm -> (sharded LM logits, binary logits [b, 2])."""
        return parallel_logits(self.transform(h), word, self.mesh, self.bias), self.binary_logits(h)

    def binary_logits(self, h: torch.Tensor) -> torch.Tensor | None:
        if self.binary is None:
            return None
        if self.mesh.sequence_parallel:  # [CLS] lives on TP rank 0's chunk; gather it
            h = gather_from_sp(h, self.mesh.tp_group, 0, grad_is_partial=False)
        cls = h[0]
        ring = ContextGroup.from_mesh(self.mesh)
        if ring is not None:  # ... and on CP rank 0's share of the sequence
            cls = broadcast_from_first(cls, ring)
        return self.binary(torch.tanh(self.pooler(cls)))

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))

    def predicted_logits(self, h: torch.Tensor, word: torch.Tensor, where: torch.Tensor
                         ) -> torch.Tensor:
        """Sharded logits [n, vocab/tp] of the n positions where `where` [s, b] is True only.
        Why: about 15% of the tokens are predicted, and the vocabulary-wide product is the
        largest matmul of a small BERT (as the original BERT gathers masked positions first)."""
        return parallel_logits(self.transform(h), word, self.mesh, self.bias, where)


class BertModel(nn.Module):
    def __init__(self, cfg: TransformerConfig, mesh: ParallelMesh, *, seed: int = 1234,
                 tracker: RNGTracker | None = None, stage: ChunkSpec | None = None,
                 add_binary_head: bool = True, recompute_granularity: str | None = None,
                 task_head: HeadConfig | None = None) -> None:
        super().__init__()
        cfg.validate(mesh.tp_size, mesh.pp_size, mesh.virtual_pipeline, mesh.sequence_parallel,
                     mesh.stage_split)
        check_context_parallel(mesh.cp_size, cfg.seq_length, cfg.attention_dropout)
        if cfg.untie_embeddings_and_output_weights:
            raise ValueError("BERT ties its masked-LM output to the word embeddings; drop "
                             "--untie-embeddings-and-output-weights")
        self.cfg, self.mesh = cfg, mesh
        self.stage = stage or ChunkSpec.whole(cfg.num_layers)
        self.embedding = (Embedding(cfg, mesh, seed, tracker, num_tokentypes=2)
                          if self.stage.is_first else None)
        self.encoder = TransformerStack(cfg, mesh, self.stage.first_layer, self.stage.last_layer,
                                        seed, tracker, recompute_granularity, prefix="encoder")
        self.final_norm = self.heads = self.output_word = None
        self.task_head = task_head
        if self.stage.is_last:
            self.final_norm = final_norm(cfg, mesh)
            if task_head is not None:
                self.heads = ClassificationHead(task_head, cfg.hidden_size, mesh, seed,
                                                cfg.init_method_std)
            else:
                self.heads = BertHeads(cfg, mesh, seed, add_binary_head, prefix="heads")
            if not self.stage.is_first and task_head is None:
                self.output_word = word_embedding(cfg, mesh, seed)

    def shared_embedding_weight(self) -> torch.Tensor | None:
        if self.task_head is not None:  # no masked-LM output layer to tie
            return None
        if self.embedding is not None:
            return self.embedding.word.weight
        return self.output_word.weight if self.output_word is not None else None

    def forward(self, input_ids: torch.Tensor | None = None,
                tokentype_ids: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                predicted: torch.Tensor | None = None):
        """padding_mask [b, s] bool, True = padding (never attended to; under context
        parallelism the whole sequence's, while the other inputs are s/cp). Not last stage: hidden
        states. Last stage: (per-token LM loss [b, s] if labels else sharded logits,
        binary logits [b, 2] or None). Labels of unmasked positions are ignored by the caller's
        loss mask; pass any valid id there. `predicted` [b, s] bool (with labels): compute the
        LM head only there; the loss is 0 elsewhere. With a task head: logits [b, classes] (`lengths`
        [b] only matters for mean pooling)."""
        mask = None if padding_mask is None else padding_mask[:, None, None, :]
        if self.embedding is not None:
            positions = None
            if self.mesh.cp_size > 1:
                s = input_ids.shape[1] * self.mesh.cp_size
                positions = zigzag_positions(s, self.mesh.cp_size, self.mesh.cp_rank,
                                             input_ids.device)[None]
            x = self.embedding(input_ids, positions, tokentype_ids)
        else:
            if hidden_states is None:
                raise ValueError("this pipeline stage has no embedding: pass hidden_states")
            x = hidden_states
        x = self.encoder(x, mask, causal=False)
        if not self.stage.is_last:
            return x
        if self.task_head is not None:
            return self.heads(self.final_norm(x), lengths)
        if labels is not None and predicted is not None:
            return self._predicted_loss(self.final_norm(x), labels, predicted)
        logits, binary = self.heads(self.final_norm(x), self.shared_embedding_weight())
        if labels is None:
            return logits, binary
        return token_loss(logits, labels, self.mesh, self.cfg.vocab_size), binary

    def _predicted_loss(self, h: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token LM loss [b, s] computed at the `predicted` positions only, + binary logits."""
        binary = self.heads.binary_logits(h)
        where = predicted.t()  # [s, b], as the hidden states
        logits = self.heads.predicted_logits(h, self.shared_embedding_weight(), where)
        picked = token_loss(logits[:, None], labels.t()[where][None], self.mesh,
                            self.cfg.vocab_size)[0]
        loss = torch.zeros(where.shape, dtype=picked.dtype, device=picked.device)
        return loss.masked_scatter(where, picked).t(), binary
