"""GPT: a causal language model. One class serves every pipeline stage: the first stage owns the
embedding, the last the final norm, output layer and loss, and each stage its layer range.

    input_ids [b, s] -> embedding -> layers[first:last] -> final norm -> logits [s, b, vocab/tp]
                                                                      -> loss per token [b, s]

With a `task_head` (fine-tuning) the last stage ends in a classification head instead of the
output layer: final norm -> pooled hidden state -> logits [b, classes] (megapre/model/heads.py).

With tied embeddings (the default) the output layer multiplies by the word table; a last stage
that is not also the first keeps its own copy of the table (built from the same generator) whose
gradient the pipeline sums with the first stage's (`shared_embedding_weight`). With a factorized
embedding (--embedding-size E) the tied table is [vocab, E]: the last stage first projects the
final hidden states down to E with its own replicated linear (`output_project`, as ALBERT's
head maps hidden -> E); an untied output layer stays [vocab, hidden].

Under context parallelism every tensor along the sequence holds this CP rank's zig-zag share
(s/cp tokens, megapre.parallel.context); positions default to those tokens' true positions, so
learned position embeddings and RoPE see what one process running the whole sequence sees.
"""
from __future__ import annotations

import torch
from torch import nn

from megapre.parallel.context import zigzag_positions
from megapre.parallel.layers import ColumnParallelLinear
from megapre.parallel.layout import check_context_parallel
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.pipeline import ChunkSpec
from megapre.parallel.random import RNGTracker

from . import init
from .config import TransformerConfig
from .embedding import Embedding, replicated_linear, word_embedding
from .heads import ClassificationHead, HeadConfig
from .lm_head import full_logits, parallel_logits, token_loss
from .rope import rope_frequencies
from .transformer import TransformerStack, final_norm


class GPTModel(nn.Module):
    def __init__(self, cfg: TransformerConfig, mesh: ParallelMesh, *, seed: int = 1234,
                 tracker: RNGTracker | None = None, stage: ChunkSpec | None = None,
                 recompute_granularity: str | None = None, label_smoothing: float = 0.0,
                 task_head: HeadConfig | None = None) -> None:
        super().__init__()
        cfg.validate(mesh.tp_size, mesh.pp_size, mesh.virtual_pipeline, mesh.sequence_parallel,
                     mesh.stage_split)
        check_context_parallel(mesh.cp_size, cfg.seq_length, cfg.attention_dropout)
        self.cfg, self.mesh = cfg, mesh
        self.stage = stage or ChunkSpec.whole(cfg.num_layers)
        self.label_smoothing = label_smoothing
        self.embedding = Embedding(cfg, mesh, seed, tracker) if self.stage.is_first else None
        self.decoder = TransformerStack(cfg, mesh, self.stage.first_layer, self.stage.last_layer,
                                        seed, tracker, recompute_granularity, prefix="decoder")
        self.final_norm = self.output_layer = self.output_word = self.heads = None
        self.output_project = None
        self.output_quant = None  # an int8 output layer (megapre.compress --quantize-lm-head)
        self.task_head = task_head
        if self.stage.is_last:
            self.final_norm = final_norm(cfg, mesh)
            if task_head is not None:
                self.heads = ClassificationHead(task_head, cfg.hidden_size, mesh, seed,
                                                cfg.init_method_std)
            elif cfg.untie_embeddings_and_output_weights:
                self.output_layer = ColumnParallelLinear(
                    cfg.hidden_size, cfg.padded_vocab_size(mesh.tp_size), mesh, bias=False,
                    init_method=init.normal(seed, "output_layer.weight", cfg.init_method_std))
            else:
                if not self.stage.is_first:
                    self.output_word = word_embedding(cfg, mesh, seed)
                if cfg.factorized_embedding:
                    self.output_project = _output_project(cfg, mesh, seed)
        self.rope_dim = None
        if cfg.position_embedding_type == "rope":
            self.rope_dim = int(cfg.head_dim * cfg.rotary_percent) // 2 * 2

    def shared_embedding_weight(self) -> torch.Tensor | None:
        """The word table used by the output layer when embeddings are tied (None when untied,
        with a task head, or when this stage has neither end)."""
        if self.cfg.untie_embeddings_and_output_weights or self.task_head is not None:
            return None
        if self.embedding is not None:
            return self.embedding.word.weight
        return self.output_word.weight if self.output_word is not None else None

    def _positions(self, s: int, device) -> torch.Tensor:
        """Default positions of this rank's s tokens: 0..s-1, or under context parallelism the
        true positions of its zig-zag share of the s * cp-token sequence."""
        cp = self.mesh.cp_size
        if cp == 1:
            return torch.arange(s, device=device)
        return zigzag_positions(s * cp, cp, self.mesh.cp_rank, device)

    def _rope(self, s: int, position_ids: torch.Tensor | None, device) -> torch.Tensor | None:
        if self.rope_dim is None:
            return None
        if position_ids is None:
            return rope_frequencies(self._positions(s, device), self.rope_dim,
                                    self.cfg.rotary_base, self.cfg.rotary_interleaved)
        pos = position_ids.t()  # [s, b]
        ang = rope_frequencies(pos.reshape(-1), self.rope_dim, self.cfg.rotary_base,
                               self.cfg.rotary_interleaved)
        return ang.view(*pos.shape, -1)

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: input_ids [b, s]; later stages: hidden_states [s(/tp), b, h] from the
        previous stage. attention_mask (optional, bool, True = masked) [b or 1, 1, s, s] adds to
        the causal mask (e.g. document boundaries); under context parallelism its rows are this
        rank's tokens and its columns the whole sequence [b or 1, 1, s/cp, s]. Returns the
        hidden states (not last stage), the per-token loss [b, s] when labels are given, else
        sharded logits [s, b, vocab/tp];
        with a task head, logits [b, classes] pooled at `lengths` [b] (real tokens per sample,
        right padding, which causal attention never lets a real token see)."""
        if self.embedding is not None:
            s = input_ids.shape[1]
            pos = position_ids
            if pos is None and self.mesh.cp_size > 1:
                pos = self._positions(s, input_ids.device)[None]
            x = self.embedding(input_ids, pos)
        else:
            if hidden_states is None:
                raise ValueError("this pipeline stage has no embedding: pass hidden_states")
            x = hidden_states
            s = x.shape[0] * (self.mesh.tp_size if self.mesh.sequence_parallel else 1)
        x = self.decoder(x, attention_mask, causal=True, rope=self._rope(s, position_ids, x.device))
        if not self.stage.is_last:
            return x
        x = self.final_norm(x)
        if self.heads is not None:
            return self.heads(x, lengths)
        logits = self.lm_logits(x)
        if labels is None:
            return logits
        return token_loss(logits, labels, self.mesh, self.cfg.vocab_size, self.label_smoothing)

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Sharded logits [s, b, vocab/tp] of the final-norm output x [s(/tp), b, h]; through
        the int8 head when megapre.compress quantized it (--quantize-lm-head)."""
        if self.output_layer is not None:
            return parallel_logits(x, self.output_layer.weight, self.mesh)
        if self.output_project is not None:
            x = self.output_project(x)
        if self.output_quant is not None:
            return self.output_quant(x)
        return parallel_logits(x, self.shared_embedding_weight(), self.mesh)

    def gathered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[b, s, vocab] logits without the padded columns (generation, evaluation)."""
        return full_logits(logits, self.mesh, self.cfg.vocab_size)


def _output_project(cfg: TransformerConfig, mesh: ParallelMesh, seed: int) -> nn.Linear:
    """hidden -> E before the tied [vocab, E] table. It sees this rank's tokens only under
    sequence parallelism, so its grads are then summed over TP."""
    lin = replicated_linear(cfg.hidden_size, cfg.embedding_dim, mesh, seed, "output_project",
                            cfg.init_method_std, bias=False)
    lin.weight.sequence_parallel = mesh.sequence_parallel
    return lin
