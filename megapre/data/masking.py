"""Masked-LM corruption for BERT: which tokens the model must predict, and what it sees instead.

About `mask_prob` of a sample's ordinary tokens (everything but [CLS], [SEP], [PAD], [MASK])
are chosen; each chosen token becomes [MASK] (80%), a random ordinary vocabulary token (10%) or
stays itself (10%), so the model cannot learn that only [MASK] positions matter.

Choices are made per *word* when `whole_word` is on: a WordPiece continuation token ("##ing",
flagged by the tokenizer's continuation_mask()) joins the word before it, so a word is predicted
whole or not at all. With `max_ngrams > 1` a choice covers n consecutive words (never crossing a
special token), n drawn from a named distribution:

- "harmonic": P(n) proportional to 1/n for n = 1..max_ngrams (Megatron-LM's default n-gram masking).
- "geometric": P(n) proportional to p(1-p)^(n-1), p = 0.2, truncated at max_ngrams and renormalized
  (SpanBERT's span-length distribution, which SpanBERT clips rather than renormalizes).

All randomness comes from the generator the caller passes in, so a sample is a pure function of
(tokens, generator state): datasets seed one generator per sample index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

NGRAM_DISTRIBUTIONS = ("harmonic", "geometric")


@dataclass(frozen=True)
class MaskingConfig:
    mask_prob: float = 0.15          # share of ordinary tokens to predict
    mask_token_prob: float = 0.8     # of the predicted: replaced by [MASK]
    random_token_prob: float = 0.1   # of the predicted: replaced by a random token (rest: unchanged)
    whole_word: bool = True          # never split a WordPiece word
    max_ngrams: int = 3              # 1 = single words/tokens; 3 (with harmonic) = Megatron's pretrain_bert
    ngram_distribution: str = "harmonic"
    geometric_p: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob={self.mask_prob}: must be in (0, 1), e.g. 0.15")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(
                f"mask_token_prob={self.mask_token_prob}, random_token_prob={self.random_token_prob}: "
                "each must be >= 0 and their sum <= 1 (BERT uses 0.8 and 0.1)"
            )
        if self.max_ngrams < 1:
            raise ValueError(f"max_ngrams={self.max_ngrams}: must be >= 1 (1 turns n-gram masking off)")
        if self.ngram_distribution not in NGRAM_DISTRIBUTIONS:
            raise ValueError(f"ngram_distribution={self.ngram_distribution!r}: choose one of {NGRAM_DISTRIBUTIONS}")
        if not 0.0 < self.geometric_p <= 1.0:
            raise ValueError(f"geometric_p={self.geometric_p}: must be in (0, 1]")


def ngram_probabilities(max_ngrams: int, distribution: str = "harmonic", geometric_p: float = 0.2) -> np.ndarray:
    """P(n) for n = 1..max_ngrams under the named distribution (see the module docstring)."""
    n = np.arange(1, max_ngrams + 1, dtype=np.float64)
    if distribution == "harmonic":
        w = 1.0 / n
    elif distribution == "geometric":
        w = geometric_p * (1.0 - geometric_p) ** (n - 1)
    else:
        raise ValueError(f"ngram_distribution={distribution!r}: choose one of {NGRAM_DISTRIBUTIONS}")
    return w / w.sum()


@dataclass
class MaskedTokens:
    tokens: np.ndarray     # int64[L]: the corrupted input
    labels: np.ndarray     # int64[L]: original id where predicted, -1 elsewhere
    loss_mask: np.ndarray  # int64[L]: 1 where predicted


@dataclass
class Words:
    """Word structure of one token sequence: word w covers tokens [start[w], end[w])."""

    start: np.ndarray        # int64[W]
    end: np.ndarray          # int64[W]
    run_last: np.ndarray     # int64[W]: index of the last word in w's run of ordinary tokens
    num_candidates: int      # ordinary (maskable) tokens


class Masker:
    """Applies MaskingConfig to token sequences of one vocabulary."""

    def __init__(
        self,
        config: MaskingConfig,
        vocab_size: int,
        mask_id: int,
        special_ids: Iterable[int],
        continuation: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.vocab_size = int(vocab_size)
        self.mask_id = int(mask_id)
        self._special = np.zeros(self.vocab_size, dtype=bool)
        for i in list(special_ids) + [mask_id]:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"special token id {i} is outside the vocabulary [0, {self.vocab_size})")
            self._special[i] = True
        if continuation is None or not config.whole_word:
            self._continuation = np.zeros(self.vocab_size, dtype=bool)
        else:
            continuation = np.asarray(continuation, dtype=bool)
            if continuation.shape != (self.vocab_size,):
                raise ValueError(f"continuation mask has shape {continuation.shape}, expected ({self.vocab_size},)")
            self._continuation = continuation & ~self._special
        self._random_pool = np.flatnonzero(~self._special)  # replacement tokens: ordinary ids only
        if self._random_pool.size == 0:
            raise ValueError("the vocabulary has no ordinary token to predict (all ids are special)")
        # Row a-1: cumulative P(n | at most a words available), for inverse-CDF draws.
        probs = ngram_probabilities(config.max_ngrams, config.ngram_distribution, config.geometric_p)
        self._cdf = [np.cumsum(probs[:a]) / probs[:a].sum() for a in range(1, config.max_ngrams + 1)]

    def words(self, tokens: np.ndarray) -> Words:
        """Group the ordinary tokens into words (whole_word) or single-token units."""
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)][0]
            raise ValueError(
                f"token id {bad} is outside the tokenizer's vocabulary [0, {self.vocab_size}): the dataset "
                "was tokenized with a different vocabulary than the tokenizer given"
            )
        cand = ~self._special[tokens]
        prev_cand = np.zeros_like(cand)
        prev_cand[1:] = cand[:-1]
        is_start = cand & ~(self._continuation[tokens] & prev_cand)
        start = np.flatnonzero(is_start)
        boundary = np.concatenate((np.flatnonzero(is_start | ~cand), [tokens.size]))
        end = boundary[np.searchsorted(boundary, start, side="right")]
        run = np.cumsum(~cand)[start]  # words in one run of ordinary tokens share this number
        run_last = np.searchsorted(run, run, side="right") - 1
        return Words(start, end, run_last, int(cand.sum()))

    def choose_spans(self, tokens: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
        """Token spans [a, b) to predict: word-aligned, disjoint, each at most max_ngrams words,
        together round(mask_prob * ordinary tokens) tokens at most (at least one)."""
        words = self.words(tokens)
        num_words = words.start.size
        if num_words == 0:
            return []
        budget = min(words.num_candidates, max(1, int(np.floor(self.config.mask_prob * words.num_candidates + 0.5))))
        order = rng.permutation(num_words).tolist()
        ngram = self._draw_ngram_sizes(words, rng).tolist()
        start, end = words.start.tolist(), words.end.tolist()  # plain lists: this loop is per token
        taken = bytearray(tokens.size)
        spans: list[tuple[int, int]] = []
        count = 0
        for w in order:
            if count >= budget:
                break
            n, a = ngram[w], start[w]
            while n > 0 and count + end[w + n - 1] - a > budget:
                n -= 1  # shrink an n-gram that would overshoot the budget
            if n == 0:
                continue
            b = end[w + n - 1]
            if taken.find(1, a, b) != -1:
                continue
            taken[a:b] = b"\x01" * (b - a)
            spans.append((a, b))
            count += b - a
        return spans

    def _draw_ngram_sizes(self, words: Words, rng: np.random.Generator) -> np.ndarray:
        """n for every word as a possible span start, from P(n) renormalized over the words left in
        its run (an n-gram never crosses a special token)."""
        num_words = words.start.size
        if self.config.max_ngrams == 1:
            return np.ones(num_words, dtype=np.int64)
        u = rng.random(num_words)
        avail = np.minimum(words.run_last - np.arange(num_words) + 1, self.config.max_ngrams)
        n = np.ones(num_words, dtype=np.int64)
        for a in range(2, self.config.max_ngrams + 1):
            sel = avail == a
            if sel.any():
                n[sel] = 1 + np.searchsorted(self._cdf[a - 1], u[sel], side="right")
        return np.minimum(n, avail)

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> MaskedTokens:
        tokens = np.asarray(tokens, dtype=np.int64)
        spans = self.choose_spans(tokens, rng)
        positions = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, np.int64)
        positions.sort()
        out = tokens.copy()
        u = rng.random(positions.size)
        to_mask = u < self.config.mask_token_prob
        to_random = ~to_mask & (u < self.config.mask_token_prob + self.config.random_token_prob)
        out[positions[to_mask]] = self.mask_id
        out[positions[to_random]] = self._random_pool[rng.integers(0, self._random_pool.size, int(to_random.sum()))]
        labels = np.full(tokens.size, -1, dtype=np.int64)
        labels[positions] = tokens[positions]
        loss_mask = np.zeros(tokens.size, dtype=np.int64)
        loss_mask[positions] = 1
        return MaskedTokens(out, labels, loss_mask)
