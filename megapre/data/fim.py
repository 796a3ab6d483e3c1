"""Fill-in-the-middle (FIM) GPT samples, Megatron-LM's `--fim-data` (Bavarian et al. 2022).

A FIM sample is a GPT sample (seq_length + 1 tokens over the shuffled documents) in which each
document piece, the tokens between two EODs, is, with probability --fim-rate, cut at two
character positions into prefix, middle and suffix (drawn uniformly in [0, len(text)], sorted:
any part may be empty) and rearranged so the model learns to write the middle after seeing both
sides:

    PSM:  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM:  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle   (with --fim-spm-rate)

The cut is made on the decoded text and each part re-encoded, so a part never starts or ends in
the middle of a character; the sentinels and re-encoding change the token count, so the sample is
cut back to, or padded (<fim_pad>, no loss) up to, its seq_length + 1 tokens. With
--fim-split-sample TOKEN a piece holding TOKEN (say, a file separator in a repository) is, with
probability --fim-rate, split at it and each fragment transformed with --fim-fragment-rate.
--fim-no-prefix TEXT leaves pieces whose text starts with TEXT untouched.

The draws are Megatron's (Bernoulli for "transform?", two uniform character positions, Bernoulli
for SPM, in that order) but from a generator seeded per sample by (--seed, dataset, sample index)
instead of one generator shared in access order, so a sample is the same whichever worker reads
it, in whatever order, and after a resume. Two more departures, both keeping the document text
whole: every EOD and split token is kept (Megatron drops the one before an empty piece), and empty
pieces stay empty (Megatron gives an empty last piece three sentinels).

The sentinel tokens come from the tokenizer where it has them; otherwise they are appended to its
vocabulary (megapre.data.tokenizer.added), which the model's vocabulary and the checkpoint's
tokenizer record then include.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from megapre.data.gpt_dataset import causal_lm_sample
from megapre.data.tokenizer.added import single_token_id
from megapre.errors import ConfigError

NO_TEXT_TOKENIZERS = ("NullTokenizer",)  # ids with no text to cut at characters


@dataclass(frozen=True)
class FIMConfig:
    """What --fim-* say (Megatron's names and defaults); `seed` is the run's --seed."""

    rate: float = 0.5
    spm_rate: float = 0.5
    split_sample: str | None = None
    fragment_rate: float | None = None
    no_prefix: str | None = None
    prefix_token: str = "<fim_prefix>"
    middle_token: str = "<fim_middle>"
    suffix_token: str = "<fim_suffix>"
    pad_token: str = "<fim_pad>"
    eod_token: str = "<|endoftext|>"
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate", "fragment_rate"):
            _check_rate(f"--fim-{name.replace('_', '-')}", getattr(self, name))
        if self.split_sample is not None and self.fragment_rate is None:
            raise ConfigError(f"--fim-split-sample {self.split_sample} needs --fim-fragment-rate "
                              "(the FIM rate of each fragment)")

    def sentinels(self) -> tuple[str, ...]:
        """The tokens FIM inserts, which the vocabulary must hold (appended where it lacks them)."""
        return (self.prefix_token, self.middle_token, self.suffix_token, self.pad_token)


def _check_rate(flag: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag} {value}: must be a probability in [0, 1]")


@dataclass(frozen=True)
class FIMTokenIds:
    """The ids of the sentinels (and of the EOD and split token) in the run's vocabulary."""

    prefix: int
    middle: int
    suffix: int
    pad: int
    eod: int
    split: int | None = None


def check_tokenizer_type(tokenizer_type: str | None) -> None:
    """FIM cuts text at characters: a tokenizer with no text (ids only) cannot do it."""
    if tokenizer_type in NO_TEXT_TOKENIZERS:
        raise ConfigError(f"--fim-data: {tokenizer_type} has no text to cut into prefix, middle "
                          "and suffix; use the tokenizer the text was preprocessed with")


def resolve_token_ids(tokenizer: Any, config: FIMConfig) -> FIMTokenIds:
    """The FIM ids of `tokenizer` (built with config.sentinels() as added tokens); ConfigError
    naming the flag when a token is not one token of its vocabulary."""
    check_tokenizer_type(tokenizer.name)
    flags = {"prefix": config.prefix_token, "middle": config.middle_token,
             "suffix": config.suffix_token, "pad": config.pad_token}
    ids = {part: _token_id(tokenizer, f"--fim-{part}-token", text) for part, text in flags.items()}
    split = None
    if config.split_sample is not None:
        split = _token_id(tokenizer, "--fim-split-sample", config.split_sample)
    return FIMTokenIds(**ids, eod=_eod_id(tokenizer, config.eod_token), split=split)


def _token_id(tokenizer: Any, flag: str, text: str) -> int:
    idx = getattr(tokenizer, "token_ids", {}).get(text)
    idx = single_token_id(tokenizer, text) if idx is None else idx
    if idx is None:
        raise ConfigError(f"{flag} {text}: not a single token of {tokenizer.name}'s vocabulary")
    return idx


def _eod_id(tokenizer: Any, text: str) -> int:
    """--fim-eod-token's id; left at Megatron's default (GPT-2's spelling), a tokenizer that
    spells its EOD otherwise (SentencePiece's </s>) uses its own EOD."""
    idx = single_token_id(tokenizer, text)
    if idx is not None:
        return idx
    if text == FIMConfig.eod_token and tokenizer.eod is not None:
        return tokenizer.eod
    if tokenizer.eod is None:
        raise ConfigError(f"--fim-data: {tokenizer.name} has no end-of-document token to split "
                          "samples into documents")
    raise ConfigError(f"--fim-eod-token {text}: not a single token of {tokenizer.name}'s "
                      "vocabulary")


class FIMTransform:
    """Turns the seq_length + 1 tokens of a GPT sample into a FIM sample of the same length."""

    def __init__(self, tokenizer: Any, config: FIMConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.ids = resolve_token_ids(tokenizer, config)

    def __call__(self, tokens: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        pieces = _split_keeping(tokens, self.ids.eod, lambda piece: self.piece(piece, rng))
        return self._fit(np.concatenate(pieces), len(tokens))

    def piece(self, piece: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        """One document's tokens: whole, or (--fim-split-sample) fragment by fragment."""
        split, c = self.ids.split, self.config
        if split is None or not (piece == split).any():
            return self.permute(piece, c.rate, rng)
        if not rng.binomial(1, c.rate):
            return piece
        parts = _split_keeping(piece, split, lambda f: self.permute(f, c.fragment_rate, rng))
        return np.concatenate(parts)

    def permute(self, tokens: np.ndarray, rate: float, rng: np.random.RandomState) -> np.ndarray:
        """With probability `rate`, `tokens` as PSM or SPM; else unchanged."""
        if not rng.binomial(1, rate):
            return tokens
        text = self.tokenizer.decode(tokens)
        if self.config.no_prefix is not None and text.startswith(self.config.no_prefix):
            return tokens
        low, high = sorted(int(b) for b in rng.randint(0, len(text) + 1, size=2))
        prefix, middle, suffix = (self._encode(t) for t in (text[:low], text[low:high], text[high:]))
        i = self.ids
        if rng.binomial(1, self.config.spm_rate):
            order = [[i.prefix, i.suffix], suffix, [i.middle], prefix, middle]
        else:
            order = [[i.prefix], prefix, [i.suffix], suffix, [i.middle], middle]
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in order])

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    def _fit(self, tokens: np.ndarray, length: int) -> np.ndarray:
        """Cut to `length` tokens, or pad up to it with the FIM pad."""
        if len(tokens) >= length:
            return tokens[:length].astype(np.int64)
        pad = np.full(length - len(tokens), self.ids.pad, dtype=np.int64)
        return np.concatenate([tokens.astype(np.int64), pad])


def _split_keeping(tokens: np.ndarray, separator: int, transform) -> list[np.ndarray]:
    """`tokens` cut at each `separator`, `transform` applied to every non-empty piece, the
    separators kept in place (so the document text stays whole)."""
    out: list[np.ndarray] = []
    start = 0
    for at in np.flatnonzero(tokens == separator):
        if at > start:
            out.append(transform(tokens[start:at]))
        out.append(tokens[at:at + 1])
        start = int(at) + 1
    if start < len(tokens):
        out.append(transform(tokens[start:]))
    return out or [tokens[:0]]


class FIMDataset:
    """A GPTDataset (megapre.data.gpt_dataset) whose samples are FIM samples; indices, length
    and caching are the GPT dataset's. Loss is off where the label is the FIM pad."""

    def __init__(self, dataset: Any, transform: FIMTransform) -> None:
        self.dataset = dataset
        self.transform = transform
        where = f"{dataset.indexed.path_prefix}:{dataset.split}:{dataset.document_range}"
        self.salt = zlib.crc32(where.encode())

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # description, indexed, split, config ...: the GPT dataset's (the blend reads them).
        # Not for `dataset` itself, which an unpickled instance lacks until its state is set.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def rng(self, idx: int) -> np.random.RandomState:
        """The sample's own generator: the same draws for sample idx in any worker or order."""
        idx %= len(self)
        return np.random.RandomState([self.transform.config.seed % 2**32, self.salt,
                                      idx % 2**32, idx >> 32])

    def tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of FIM sample idx."""
        return self.transform(self.dataset.tokens(idx), self.rng(idx))

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        sample = causal_lm_sample(self.tokens(idx), self.dataset.config)
        sample["loss_mask"][sample["labels"] == self.transform.ids.pad] = 0.0
        return sample
