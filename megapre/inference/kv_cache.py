"""Incremental decoding with a key/value cache: each step feeds only the new positions through
a GPT stage, reusing the keys and values of the earlier ones, so a token costs O(length) instead
of recomputing the whole prefix (O(length^2)).

It drives the stage's own modules (embedding, each layer's norms, QKV/projection/MLP parallel
linears, core attention, final norm, output weights) in the order their forward uses them, in eval
mode (no dropout), with two differences: positions start at the cache length, and each layer's
new keys/values are appended to its cache before attention. Core attention aligns the causal mask
bottom-right, so new queries see every cached position and the new ones up to themselves.
Tests hold it equal to the full recompute (megapre.inference.generator without a cache).
"""
from __future__ import annotations

import torch

from megapre.model.gpt import GPTModel
from megapre.model.rope import rope_frequencies
from megapre.model.transformer import TransformerLayer


class KVCache:
    """Keys and values [s, b, groups/tp, head_dim] per global layer number, for one batch."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0  # positions already cached

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.layers:
            k0, v0 = self.layers[layer]
            k, v = torch.cat([k0, k], dim=0), torch.cat([v0, v], dim=0)
        self.layers[layer] = (k, v)
        return k, v


def _layer_step(number: int, layer: TransformerLayer, x: torch.Tensor, cache: KVCache,
                rope: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TransformerLayer.forward (eval) of global layer `number` (its cache slot; a shared weight
    set serves several numbers) for the new positions x [s_new, b, h]; `mask` [b, 1, 1,
    cached + s_new] bool, True = a padding key, adds to the causal mask."""
    att = layer.attention

    def attend(y: torch.Tensor) -> torch.Tensor:
        q, k, v = att.heads(y, rope)
        k, v = cache.extend(number, k, v)
        return att.proj(att.core(q, k, v, mask, causal=True))

    return layer.block(x, attend)


@torch.no_grad()
def stage_step(model: GPTModel, cache: KVCache, input_ids: torch.Tensor | None = None,
               hidden_states: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               padding: torch.Tensor | None = None) -> torch.Tensor:
    """One pipeline stage on the new positions: token ids [b, s_new] (first stage) or hidden
    states [s_new, b, h]; returns hidden states, or sharded logits [s_new, b, vocab/tp] on the
    last stage. The caller advances `cache.length` once every stage has run. Left-padded
    batches (the ONNX graph's attention_mask) pass `positions` [b, s_new] of each sample's own
    tokens and `padding` [b, cached + s_new] bool, True = a padding key; by default positions
    continue from the cache length for every sample."""
    if model.mesh.sequence_parallel:
        raise ValueError("incremental decoding runs without --sequence-parallel")
    start = cache.length
    if model.embedding is not None:
        b, s = input_ids.shape
        pos = positions
        if pos is None:
            pos = torch.arange(start, start + s, device=input_ids.device)[None].expand(b, s)
        x = model.embedding(input_ids, pos)
    else:
        x, s = hidden_states, hidden_states.shape[0]
    rope = None if model.rope_dim is None else _rope(model, start, s, positions, x.device)
    mask = None if padding is None else padding[:, None, None, :]
    for number, layer in model.decoder.uses():
        x = _layer_step(number, layer, x, cache, rope, mask)
    if not model.stage.is_last:
        return x
    return model.lm_logits(model.final_norm(x))


def _rope(model: GPTModel, start: int, s: int, positions: torch.Tensor | None, device
          ) -> torch.Tensor:
    """RoPE angles of the new positions: [s, rot] shared, or [s, b, rot] per sample."""
    cfg = model.cfg
    if positions is None:
        return rope_frequencies(torch.arange(start, start + s, device=device), model.rope_dim,
                                cfg.rotary_base, cfg.rotary_interleaved)
    pos = positions.t()  # [s, b]
    angles = rope_frequencies(pos.reshape(-1), model.rope_dim, cfg.rotary_base,
                              cfg.rotary_interleaved)
    return angles.view(*pos.shape, -1)
