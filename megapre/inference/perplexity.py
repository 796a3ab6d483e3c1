"""Perplexity of one long token stream with a sliding window, in any TP/PP/DP layout.

A stream of N token ids has N - 1 targets (token i + 1 after tokens 0..i). The windows score each
target exactly once:

    window 0     inputs ids[0 : L]                  scores all its min(L, N - 1) targets
    window k     inputs ids[e - L : e]              scores its last n = min(stride, left) targets
                 (e = the targets done so far + n)

so once the first window is full every scored token sees at least L - stride + 1 tokens of
context, and the last window, however few targets it has left, still has a full L of context.
With stride = L (the default of megapre.evaluate) the windows do not overlap and the loss is the
pretraining loss of consecutive L + 1 token samples; a smaller stride costs L / stride times more
compute for more context per token. These are lm-evaluation-harness's rolling windows with
max_seq_len = L and context_len = L - stride + 1 (its loglikelihood_rolling uses stride = L).

The caller decides where the stream starts: megapre.evaluate and the lm-eval adapter put the
tokenizer's end-of-document token first, so the first real token is scored too (a document
boundary is all it conditions on). Words are counted by the caller as well (the number of
whitespace-separated words of the text), for word-level perplexity = exp(NLL sum / words),
the number papers quote for WikiText.

Batches of `batch_size` consecutive windows go to data-parallel replicas in turn (batch k on
replica k % DP); the sums are reduced over all ranks in float64, so every layout gives the
single process's numbers.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.distributed as dist

from megapre.errors import ConfigError

from .logprobs import TokenScorer


@dataclass(frozen=True)
class Window:
    """Inputs ids[start : start + length], targets ids[start + 1 : start + length + 1]; the last
    `scored` targets count."""

    start: int
    length: int
    scored: int


def check_stride(stride: int, seq_length: int) -> None:
    if not 1 <= stride <= seq_length:
        raise ConfigError(f"--stride {stride} must be between 1 and the window length "
                          f"{seq_length} (the checkpoint's --seq-length; the default, "
                          f"{seq_length}, gives windows that do not overlap)")


def sliding_windows(num_tokens: int, seq_length: int, stride: int) -> list[Window]:
    """The windows over a stream of `num_tokens` ids (empty when it has no target)."""
    check_stride(stride, seq_length)
    targets = num_tokens - 1
    if targets < 1:
        return []
    first = min(seq_length, targets)
    windows, done = [Window(0, first, first)], first
    while done < targets:
        n = min(stride, targets - done)
        end = done + n
        start = max(0, end - seq_length)
        windows.append(Window(start, end - start, n))
        done = end
    return windows


def window_tensors(ids: torch.Tensor, window: Window
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, score mask) of `window` over the 1-d stream `ids`; each [length]."""
    s, n = window.start, window.length
    mask = torch.zeros(n, dtype=torch.bool)
    mask[n - window.scored:] = True
    return ids[s:s + n], ids[s + 1:s + n + 1], mask


def batch_windows(ids: torch.Tensor, windows: Sequence[Window]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows stacked [b, longest], right-padded with id 0 and mask False (a causal model
    cannot see the padding from the positions before it)."""
    parts = [window_tensors(ids, w) for w in windows]
    width = max(w.length for w in windows)
    inputs = torch.zeros(len(parts), width, dtype=torch.long)
    targets = torch.zeros_like(inputs)
    mask = torch.zeros(len(parts), width, dtype=torch.bool)
    for i, (x, y, m) in enumerate(parts):
        inputs[i, :len(x)], targets[i, :len(y)], mask[i, :len(m)] = x, y, m
    return inputs, targets, mask


@dataclass
class Perplexity:
    tokens: int  # scored tokens
    words: int | None  # whitespace-separated words of the text (None: not counted)
    nll_sum: float  # sum of -log p over the scored tokens (nats)
    windows: int
    seconds: float

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def token_ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def word_ppl(self) -> float | None:
        if not self.words:
            return None
        return math.exp(min(self.nll_sum / self.words, 700.0))

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "words": self.words, "nll_sum": self.nll_sum,
                "loss": self.loss, "ppl": self.token_ppl, "token_ppl": self.token_ppl,
                "word_ppl": self.word_ppl, "windows": self.windows, "seconds": self.seconds,
                "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None}


def stream_perplexity(scorer: TokenScorer, ids: Sequence[int] | torch.Tensor, seq_length: int,
                      stride: int, batch_size: int, words: int | None = None,
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext
                      ) -> Perplexity:
    """Sliding-window perplexity of the stream `ids`; the same result on every rank.
    Collective: every rank calls it with the same arguments."""
    if batch_size < 1:
        raise ConfigError(f"--micro-batch-size {batch_size} must be >= 1")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    windows = sliding_windows(len(ids), seq_length, stride)
    if not windows:
        raise ConfigError(f"nothing to score: the text is {len(ids)} token(s) long, and "
                          "perplexity needs at least one token after the first")
    mesh = scorer.mesh
    sums = torch.zeros(2, dtype=torch.float64)  # nll, tokens
    t0 = time.perf_counter()
    for k, first in enumerate(range(0, len(windows), batch_size)):
        if k % mesh.dp_size != mesh.dp_rank:
            continue
        inputs, targets, mask = batch_windows(ids, windows[first:first + batch_size])
        with autocast():
            scores = scorer(inputs, targets)
        if scores is not None and scorer.is_scoring_rank:
            sums[0] -= scores.logprobs.double()[mask].sum()
            sums[1] += mask.sum()
    sums = _sum_over_ranks(sums, mesh.device)
    nll, tokens = sums.tolist()
    return Perplexity(tokens=int(round(tokens)), words=words, nll_sum=nll,
                      windows=len(windows), seconds=time.perf_counter() - t0)


def _sum_over_ranks(vec: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Only the scoring rank of each replica holds non-zero sums: a world-wide sum adds the
    replicas and hands the total to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return vec
    vec = vec.to(device)
    dist.all_reduce(vec)
    return vec.cpu()


def count_words(text: str) -> int:
    """Whitespace-separated words, the unit of word-level perplexity."""
    return len(text.split())
