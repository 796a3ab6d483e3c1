"""Autoregressive text generation from a GPT in any tensor/pipeline layout.

With the key/value cache (default; kv_cache.py) the prompt runs once and each step feeds only the
newest position; without it (use_cache=False, --no-kv-cache) every step recomputes the whole
prefix, the reference the cache is tested against.

A batch of prompts of different lengths shares one token buffer. Generation starts at the
shortest prompt; at position t a sample still inside its prompt keeps its prompt token, the others
take the sampled one (causal attention makes the right padding invisible to earlier positions).

Layouts: under TP the last stage's logits are all-gathered over TP (padded vocabulary columns
dropped); under PP the prefix walks the stages in order, sending hidden states point to point, and
the last stage samples. The sampled tokens are then broadcast from one last-stage rank to every
rank of the replica, so all its ranks extend the same sequences (every TP rank also samples with
the same seeded generator, so the broadcast only guards against non-deterministic kernels).
Data-parallel replicas share out the batches of prompts (generate_batches).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megapre.parallel.p2p import recv_tensor, send_tensor
from megapre.train.parallel_model import ParallelModel

from .kv_cache import KVCache, stage_step
from .sampling import SamplingConfig, sample_next

STOP_EOD, STOP_LENGTH, STOP_POSITIONS = "eod", "max_new_tokens", "max_position_embeddings"


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated tokens, without the EOD that ended them
    stop_reason: str = STOP_LENGTH


class PromptTooLongError(ValueError):
    """A prompt leaves no room for a new token within the model's positions."""


class TextGenerator:
    def __init__(self, model: ParallelModel, vocab_size: int, eod: int | None,
                 max_positions: int | None) -> None:
        if model.adapter.kind != "gpt":
            raise ValueError(f"generation needs a GPT checkpoint; this one is --model "
                             f"{model.adapter.kind}")
        self.model, self.mesh = model, model.mesh
        self.vocab_size, self.eod, self.max_positions = vocab_size, eod, max_positions
        self._by_stage = {spec.stage_index: m for spec, m in zip(model.specs, model.models)}
        self._num_stages = self.mesh.pp_size * (self.mesh.virtual_pipeline or 1)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                 seed: int, stop_at_eod: bool = True, use_cache: bool = True,
                 crop_context: bool = False) -> list[Generation]:
        """Continue each prompt (token ids) by up to max_new_tokens tokens. A model with learned
        positions stops at its last position, unless crop_context: then it conditions on the
        last max_positions tokens only (nanoGPT's sampling; the window is recomputed each step)."""
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} must be >= 1")
        window = self.max_positions if crop_context else None
        prompts = self.check_prompts(prompts, crop_context)
        out = [Generation(list(p)) for p in prompts]
        lengths = torch.tensor([len(p) for p in prompts])
        total = int(lengths.max()) + max_new_tokens
        if self.max_positions is not None and window is None:
            total = min(total, self.max_positions)
        tokens = torch.zeros(len(prompts), total, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        generator = torch.Generator().manual_seed(seed)
        for chunk in self.model.chunks:
            chunk.eval()
        cache = KVCache() if use_cache else None
        for t in range(int(lengths.min()), total):
            lo = 0 if window is None else max(0, t - window)
            if lo > 0:  # the window slid: positions restart at 0, so the cache starts over
                cache = KVCache() if use_cache else None
            logits = self._last_logits(tokens[:, lo:t], cache)
            if logits is not None:
                nxt = sample_next(logits, sampling, self.vocab_size, generator)
            else:
                nxt = torch.zeros(len(prompts), dtype=torch.long)
            nxt = self._broadcast(nxt)
            in_prompt = lengths > t
            tokens[:, t] = torch.where(in_prompt, tokens[:, t], nxt)
            self._record(out, nxt, ~in_prompt & ~done, done, max_new_tokens, stop_at_eod)
            if bool(done.all()):
                break
        for g in out:
            if g.stop_reason != STOP_EOD and len(g.ids) < max_new_tokens:
                g.stop_reason = STOP_POSITIONS
        return out

    def _record(self, out: list[Generation], nxt: torch.Tensor, active: torch.Tensor,
                done: torch.Tensor, max_new_tokens: int, stop_at_eod: bool) -> None:
        """Append this step's token to every sample past its prompt and not finished; mark
        the ones that hit EOD or their token budget as done (in place)."""
        for i in torch.nonzero(active).flatten().tolist():
            tok = int(nxt[i])
            if stop_at_eod and tok == self.eod:
                out[i].stop_reason, done[i] = STOP_EOD, True
                continue
            out[i].ids.append(tok)
            if len(out[i].ids) >= max_new_tokens:
                done[i] = True

    def check_prompts(self, prompts: list[list[int]], crop_context: bool = False
                      ) -> list[list[int]]:
        """The prompts as generated (an empty one becomes [EOD]); ValueError naming the first
        bad one (empty without an EOD token, ids outside the vocabulary, too long)."""
        return [self._check_prompt(i, p, crop_context) for i, p in enumerate(prompts)]

    def _check_prompt(self, i: int, ids: list[int], crop: bool) -> list[int]:
        if not ids:
            if self.eod is None:
                raise ValueError(f"prompt {i} is empty and the tokenizer has no end-of-document "
                                 "token to start an unconditional sample from; give some text")
            return [self.eod]  # unconditional: continue from a document boundary
        bad = [x for x in ids if not 0 <= x < self.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if self.max_positions is not None and len(ids) >= self.max_positions and not crop:
            raise PromptTooLongError(
                f"prompt {i} has {len(ids)} tokens but the model has only {self.max_positions} "
                "positions (--max-position-embeddings), leaving no room to generate; shorten the "
                "prompt, or pass --crop-context to condition on its last tokens only")
        return ids

    def _last_logits(self, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor | None:
        """Logits [b, vocab] at the last position of `tokens` [b, t] on the last pipeline
        stage; None on the other stages. With a cache only positions >= cache.length run."""
        mesh, dev = self.mesh, self.mesh.device
        pp, ranks = mesh.pp_size, mesh.pp_ranks
        if cache is not None:
            tokens = tokens[:, cache.length:]
        out = None
        for s in range(self._num_stages):
            if s % pp != mesh.pp_rank:
                continue
            m = self._by_stage[s]
            ids = tokens.to(dev) if s == 0 else None
            hidden = None if s == 0 else recv_tensor(ranks[(s - 1) % pp], dev)
            if cache is not None:
                x = stage_step(m, cache, input_ids=ids, hidden_states=hidden)
            else:
                x = m(input_ids=ids, hidden_states=hidden)
            if s == self._num_stages - 1:
                out = m.gathered_logits(x[-1:])[:, 0]
            else:
                send_tensor(x, ranks[(s + 1) % pp])
        if cache is not None:
            cache.length += tokens.shape[1]
        return out

    def _broadcast(self, nxt: torch.Tensor) -> torch.Tensor:
        """Every rank of this model replica takes the tokens of its last stage's TP rank 0
        (within the TP group, then down the pipeline); other replicas are not involved."""
        mesh = self.mesh
        if not dist.is_initialized() or (mesh.tp_size == 1 and mesh.pp_size == 1):
            return nxt
        buf = nxt.to(mesh.device)
        last = mesh.pp_size - 1
        if mesh.tp_size > 1 and mesh.is_last_stage:
            dist.broadcast(buf, mesh.rank_of(last, mesh.dp_rank, 0), group=mesh.tp_group)
        if mesh.pp_size > 1:
            dist.broadcast(buf, mesh.rank_of(last, mesh.dp_rank, mesh.tp_rank),
                           group=mesh.pp_group)
        return buf.cpu()


def generate_batches(gen: TextGenerator, prompts: list[list[int]], batch_size: int,
                     max_new_tokens: int, sampling: SamplingConfig, seed: int,
                     stop_at_eod: bool = True, use_cache: bool = True,
                     crop_context: bool = False, autocast=None) -> list[Generation]:
    """All prompts in batches of batch_size; batch k draws from seed + k and runs on
    data-parallel replica k % DP, so the text does not depend on the number of replicas.
    Every rank returns the generations of every prompt, in order."""
    mesh = gen.mesh
    gen.check_prompts(prompts, crop_context)  # every rank fails alike, before any collective
    mine: dict[int, list[Generation]] = {}
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        if k % mesh.dp_size != mesh.dp_rank:
            continue
        with autocast() if autocast is not None else contextlib.nullcontext():
            mine[k] = gen.generate(prompts[start:start + batch_size], max_new_tokens, sampling,
                                   seed + k, stop_at_eod, use_cache, crop_context)
    if mesh.dp_size > 1:
        mine = _gather_replicas(mine, mesh)
    return [g for k in sorted(mine) for g in mine[k]]


def _gather_replicas(mine: dict[int, list[Generation]], mesh) -> dict[int, list[Generation]]:
    """Union of every replica's batches (plain lists of ints and strings travel as objects)."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: [dataclasses.asdict(g) for g in v] for k, v in mine.items()})
    merged: dict[int, list[Generation]] = {}
    for part in parts:
        for k, gens in part.items():
            merged.setdefault(int(k), [Generation(**g) for g in gens])
    return merged
