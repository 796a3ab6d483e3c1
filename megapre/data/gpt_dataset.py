"""GPT (causal LM) samples over an IndexedDataset split: fixed-length windows that cross documents.

Three indices define the samples (same layout and, for the same seed, the same values as
megatron-core's GPTDataset, so a run can move between the two):

- document index: the split's sequences (one per document for `_document` data), repeated for as
  many epochs as `num_samples` needs and shuffled. Megatron's separate-last-epoch rule: when the
  last epoch contributes fewer than 80% of an epoch's samples, it is shuffled on its own, so the
  partial epoch draws evenly from the whole corpus instead of from whatever documents the global
  shuffle put at the end.
- sample index: int64 rows (document index position, offset); sample k is the seq_length + 1
  tokens from row k to row k+1 (C++, megapre._C.data.build_sample_idx).
- shuffle index: a permutation of the samples (the partial last epoch permuted separately, as above).

They are cached on disk under a hash of everything that defines them (index_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from megapre.data.errors import DataError
from megapre.data.gpt_helpers import build_sample_idx
from megapre.data.index_cache import CacheConfig, CachedDataset
from megapre.data.notify import warn
from megapre.data.split import check_document_range

INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80  # megatron-core's value


class TokenSource(Protocol):
    """What GPTDataset needs from megapre.data.indexed.IndexedDataset."""

    sequence_lengths: np.ndarray
    document_indices: np.ndarray
    path_prefix: str

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray: ...


@dataclass
class GPTDatasetConfig:
    """Options of the GPT sample dataset (Megatron flag names in brackets).

    seq_length [--seq-length]: tokens per sample fed to the model (each sample reads one more for
      the shifted labels).
    seed [--seed]: shuffles the document and sample indices.
    eod_token: the tokenizer's end-of-document id; needed by the three options below.
    eod_mask_loss [--eod-mask-loss]: no loss where the input token is EOD.
    reset_position_ids [--reset-position-ids]: positions restart at 0 after each EOD.
    reset_attention_mask [--reset-attention-mask]: tokens attend only within their document
      (adds `attention_mask`).
    create_attention_mask: add the causal `attention_mask` [1, seq, seq] (True = masked) even
      without reset_attention_mask (fused attention kernels build it themselves; off by default).
    separate_last_epoch_threshold: Megatron's 0.80 (see module docstring).
    cache: where indices are cached and who builds them.
    vocab_size: when set, every sample's ids are checked to lie in [0, vocab_size) (two
      reductions per sample), so bad data fails naming its file, not deep in the model.
    """

    seq_length: int
    seed: int = 1234
    eod_token: int | None = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    create_attention_mask: bool = False
    separate_last_epoch_threshold: float = SEPARATE_LAST_EPOCH_THRESHOLD
    cache: CacheConfig = field(default_factory=CacheConfig)
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        needs_eod = [n for n in ("eod_mask_loss", "reset_position_ids", "reset_attention_mask")
                     if getattr(self, n)]
        if needs_eod and self.eod_token is None:
            raise ValueError(f"{', '.join(needs_eod)} need the tokenizer's EOD id: set eod_token")

    def index_description(self) -> dict[str, Any]:
        """The options that change the indices (loss/position options do not)."""
        return {"seq_length": self.seq_length, "seed": self.seed, "add_extra_token": 1,
                "separate_last_epoch_threshold": self.separate_last_epoch_threshold}


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """Fewest epochs whose tokens give num_samples windows of seq_length + 1 (overlapping by one)."""
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(units: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_last_epoch: bool) -> np.ndarray:
    """`units` repeated num_epochs times and shuffled (the last epoch alone when separate)."""
    dtype = np.int32 if len(units) == 0 or int(units.max()) <= np.iinfo(np.int32).max else np.int64
    if separate_last_epoch and num_epochs > 1:
        first = build_document_index(units, num_epochs - 1, rng, False)
        last = build_document_index(units, 1, rng, False)
        return np.concatenate((first, last))
    index = np.tile(units.astype(dtype), num_epochs)
    rng.shuffle(index)
    return index


def build_shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of [0, total): [0, num_first) and [num_first, total) shuffled separately."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    last = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(sizes: np.ndarray, units: np.ndarray, num_samples: int | None, seq_length: int,
                      seed: int, threshold: float = SEPARATE_LAST_EPOCH_THRESHOLD,
                      progress: Callable[[int, int, str], None] | None = None) -> dict[str, np.ndarray]:
    """Document, sample and shuffle index for the sequences `units` (ids into `sizes`).

    num_samples None means one epoch. The caller guarantees the units hold at least one token.
    `progress(done, total, next step)` is told after each step, counting the document-index entries
    and (twice: sample index, shuffle) the samples, the work each step is linear in.
    """
    tokens_per_epoch = int(sizes[units].sum(dtype=np.int64))
    epochs = 1 if num_samples is None else num_epochs_needed(tokens_per_epoch, num_samples, seq_length)
    separate = False
    if epochs > 1:
        samples_before_last = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = (num_samples - samples_before_last) < int(threshold * samples_per_epoch)
    report = progress or (lambda done, total, what: None)
    rng = np.random.RandomState(seed)
    samples = max(1, (epochs * tokens_per_epoch - 1) // seq_length)
    work = epochs * len(units) + 2 * samples
    report(0, work, "document index")
    document_index = build_document_index(units, epochs, rng, separate)
    report(len(document_index), work, "sample index")
    sample_index = build_sample_idx(sizes, document_index, seq_length)
    report(len(document_index) + samples, work, "shuffle index")
    total = sample_index.shape[0] - 1
    first = samples_before_last if separate else total
    shuffle_index = build_shuffle_index(first, total, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset(CachedDataset):
    """Map-style dataset of GPT samples (works with torch DataLoader; picklable for workers).

    Items are dicts of numpy arrays: tokens int64 [seq], labels int64 [seq] (tokens shifted by
    one), loss_mask float32 [seq], position_ids int64 [seq], and attention_mask bool [1, seq, seq]
    (True = masked) when reset_attention_mask or create_attention_mask is set.
    len() counts every sample of the built epochs (>= num_samples).
    """

    cache_kind = "GPTDataset"
    index_names = INDEX_NAMES

    def __init__(self, indexed: TokenSource, split: str, document_range: tuple[int, int],
                 num_samples: int | None, config: GPTDatasetConfig, group: Any = None) -> None:
        self.indexed = indexed
        self.split = split
        self.config = config
        self.document_range = (int(document_range[0]), int(document_range[1]))
        self.num_samples = num_samples
        self.sequence_range = self._sequence_range()
        self._cache_split_indices(indexed.path_prefix, split, self.document_range, num_samples,
                                  config.index_description(), config.cache, group)

    @property
    def num_sequences(self) -> int:
        return self.sequence_range[1] - self.sequence_range[0]

    def _sequence_range(self) -> tuple[int, int]:
        """Sequences [first, last) of the split's documents; an empty split is an error naming it."""
        di = np.asarray(self.indexed.document_indices)
        where = f"the {self.split} split of {self.indexed.path_prefix}"
        lo, hi = check_document_range(self.document_range, len(di) - 1, where)
        first, last = int(di[lo]), int(di[hi])
        tokens = int(np.asarray(self.indexed.sequence_lengths)[first:last].sum(dtype=np.int64))
        min_tokens = self.config.seq_length + 1
        if tokens == 0 or (self.num_samples is None and tokens < min_tokens):
            raise DataError(
                f"{where} has {tokens} tokens in documents [{lo}, {hi}); one sample needs "
                f"{min_tokens} (--seq-length + 1). Use a shorter --seq-length or a larger split"
            )
        if tokens < min_tokens:
            epochs = num_epochs_needed(tokens, self.num_samples, self.config.seq_length)
            warn(f"{where} has {tokens:,} tokens, fewer than one sample ({min_tokens:,} = "
                 f"--seq-length + 1): every sample repeats its data, which is read {epochs:,} "
                 f"times (epochs) for the {self.num_samples:,} samples of the run")
        return first, last

    def _build(self) -> dict[str, np.ndarray]:
        sizes = np.require(self.indexed.sequence_lengths, np.int32, ["C_CONTIGUOUS", "ALIGNED"])
        first, last = self.sequence_range
        units = np.arange(first, last, dtype=np.int32 if last <= np.iinfo(np.int32).max else np.int64)
        return build_gpt_indices(sizes, units, self.num_samples, self.config.seq_length,
                                 self.config.seed, self.config.separate_last_epoch_threshold,
                                 progress=self._advance)

    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample idx (after the shuffle), int64."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples ({self.split} split)")
        i = int(self.shuffle_index[idx % len(self)])
        (pos_a, off_a), (pos_b, off_b) = self.sample_index[i], self.sample_index[i + 1]
        get, doc = self.indexed.get, self.document_index
        if pos_a == pos_b:
            return self._checked(get(int(doc[pos_a]), int(off_a), int(off_b - off_a + 1)).astype(np.int64), idx)
        parts = [get(int(doc[pos_a]), int(off_a))]
        parts += [get(int(doc[p])) for p in range(int(pos_a) + 1, int(pos_b))]
        parts.append(get(int(doc[pos_b]), 0, int(off_b) + 1))
        return self._checked(np.concatenate(parts).astype(np.int64), idx)

    def _checked(self, text: np.ndarray, idx: int) -> np.ndarray:
        vocab = self.config.vocab_size
        if vocab is not None and text.size and (text.min() < 0 or text.max() >= vocab):
            bad = int(text[(text < 0) | (text >= vocab)][0])
            raise DataError(f"{self.indexed.path_prefix}.bin: sample {idx} ({self.split} split) holds "
                            f"token id {bad}, outside the tokenizer's vocabulary [0, {vocab})")
        return text

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        text = self.tokens(idx)
        return causal_lm_sample(text, self.config)


def causal_lm_sample(text: np.ndarray, config: GPTDatasetConfig) -> dict[str, np.ndarray]:
    """Inputs, labels, loss mask, positions (and mask) from seq_length + 1 tokens."""
    tokens, labels = text[:-1].copy(), text[1:].copy()
    seq = len(tokens)
    loss_mask = np.ones(seq, dtype=np.float32)
    is_eod = tokens == config.eod_token if config.eod_token is not None else np.zeros(seq, dtype=bool)
    if config.eod_mask_loss:
        loss_mask[is_eod] = 0.0
    positions = np.arange(seq, dtype=np.int64)
    # Document segments: a new one starts right after every EOD token.
    starts = np.zeros(seq, dtype=np.int64)
    after_eod = np.flatnonzero(is_eod[:-1]) + 1
    starts[after_eod] = after_eod
    segment_start = np.maximum.accumulate(starts)
    if config.reset_position_ids:
        positions = positions - segment_start
    sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": positions}
    if config.reset_attention_mask or config.create_attention_mask:
        causal = np.tril(np.ones((seq, seq), dtype=bool))
        if config.reset_attention_mask:
            new_segment = np.zeros(seq, dtype=np.int64)
            new_segment[after_eod] = 1
            segment = np.cumsum(new_segment)
            causal &= segment[:, None] == segment[None, :]
        sample["attention_mask"] = ~causal[None]
    return sample
