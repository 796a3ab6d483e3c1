"""BERT pretraining samples: sentence pairs with sentence-order labels and masked-LM targets.

The corpus is an IndexedDataset with one sequence per sentence and documents as runs of sentences.
A compiled helper (csrc/data/bert_helpers.cpp, same algorithm and random streams as Megatron-LM's
build_mapping) packs consecutive sentences of each document into samples of a target length and
shuffles them; the mapping is cached on disk under a hash of everything that defines it.

Sample idx is then built from mapping row idx with a generator seeded by (seed, idx) alone, so any
worker process, on any rank, in any order, builds the same sample:

1. split the row's sentences at a random point into segments A and B; with probability 0.5 swap
   them (sentence-order prediction: is_random = 1 means "swapped");
2. truncate the pair to the row's target length, always shortening the longer segment, each token
   from its front or back at random (as Megatron);
3. [CLS] A [SEP] B [SEP], token types 0 for [CLS] A [SEP] and 1 for B [SEP];
4. mask (megapre.data.masking), pad to seq_length.

Without the binary head a sample is [CLS] A [SEP] with all its sentences (documents of one sentence
are then usable) and is_random is 0.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from megapre.data.errors import DataError
from megapre.data.index_cache import CacheConfig, CachedDataset
from megapre.data.masking import MaskingConfig, Masker
from megapre.data.split import check_document_range

MAPPING_VERSION = 1  # bump when the mapping algorithm changes: old cache entries stop matching
INDEX_NAMES = ("mapping", "document_counts")
COUNT_NAMES = ("empty_documents", "short_documents", "long_sentence_documents", "epochs")
_UNLIMITED = 2**63 - 1


@dataclass(frozen=True)
class BertDatasetConfig:
    """Options of the BERT sample dataset. Megatron equivalents: seq_length --seq-length,
    mask_prob --mask-prob, short_seq_prob --short-seq-prob, binary_head --bert-binary-head
    (--bert-no-binary-head), seed --seed, cache --data-cache-path; whole_word / max_ngrams /
    ngram_distribution are megatron-core's masking_do_full_word / masking_max_ngram /
    masking_use_geometric_distribution (True = "geometric")."""

    seq_length: int = 512                # tokens per sample, [CLS] and [SEP]s included
    mask_prob: float = 0.15
    short_seq_prob: float = 0.1          # chance of a shorter random target length (1 in round(1/p))
    binary_head: bool = True             # sentence-order prediction; needs >= 2 sentences per sample
    whole_word: bool = True              # whole_word, max_ngrams 3, harmonic: Megatron's pretrain_bert
    max_ngrams: int = 3
    ngram_distribution: str = "harmonic"
    seed: int = 1234
    long_sentence_len: int = 512         # documents with a longer sentence are skipped (see build_mapping)
    cache: CacheConfig = field(default_factory=CacheConfig)  # where the mapping is cached, who builds it

    def __post_init__(self) -> None:
        if self.seq_length < 5:
            raise ValueError(f"seq_length={self.seq_length}: must be >= 5 ([CLS] A [SEP] B [SEP] with A, B non-empty)")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob={self.short_seq_prob}: must be in [0, 1]")
        if not 0 <= self.seed < 2**32 - 1:
            raise ValueError(f"seed={self.seed}: must be in [0, 2**32 - 1)")
        if self.long_sentence_len < 1:
            raise ValueError(f"long_sentence_len={self.long_sentence_len}: must be >= 1")
        self.masking()  # validates the masking fields

    def index_description(self) -> dict[str, Any]:
        """The options that change the mapping (masking options do not)."""
        return {"mapping_version": MAPPING_VERSION, "max_length": self.seq_length - 3,
                "short_seq_prob": self.short_seq_prob, "seed": self.seed, "binary_head": self.binary_head,
                "long_sentence_len": self.long_sentence_len}

    def masking(self) -> MaskingConfig:
        return MaskingConfig(
            mask_prob=self.mask_prob,
            whole_word=self.whole_word,
            max_ngrams=self.max_ngrams,
            ngram_distribution=self.ngram_distribution,
        )


def build_mapping(
    document_indices: np.ndarray,
    sequence_lengths: np.ndarray,
    *,
    max_length: int,
    short_seq_prob: float,
    seed: int,
    binary_head: bool,
    num_samples: int | None,
    long_sentence_len: int = 512,
) -> tuple[np.ndarray, dict[str, int]]:
    """Rows (first sentence, end sentence, target length) for the documents delimited by
    `document_indices`, shuffled; plus document counts (empty, short, long-sentence, epochs).

    Documents with fewer than 2 sentences (1 without the binary head) are skipped, and so are
    documents of more than one sentence holding a sentence over `long_sentence_len` tokens
    (Megatron's rule: such "sentences" are usually unsplit junk such as tables).
    """
    try:
        import torch  # noqa: F401  (loads the libtorch libraries megapre._C links against)

        import megapre._C as C
    except ImportError as e:
        raise ImportError(
            f"the BERT sentence mapping is built by megapre's compiled library, which did not load ({e}); "
            "build it with `pip install --no-build-isolation -e .` in the megapre source tree"
        ) from e
    num_epochs, max_num_samples = (1, _UNLIMITED) if num_samples is None else (2**31 - 2, num_samples)
    return C.data.build_bert_mapping(
        np.ascontiguousarray(document_indices, dtype=np.int64),
        np.ascontiguousarray(sequence_lengths, dtype=np.int32),
        num_epochs,
        max_num_samples,
        max_length,
        short_seq_prob,
        seed,
        2 if binary_head else 1,
        long_sentence_len,
    )


def split_pair(
    sentences: Sequence[np.ndarray], binary_head: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Segments A and B of a sample, and whether they were swapped (the sentence-order label)."""
    if not binary_head:
        return np.concatenate(sentences), np.zeros(0, np.int64), False
    if len(sentences) < 2:
        raise ValueError(f"a sentence-pair sample needs at least 2 sentences, got {len(sentences)}")
    pivot = int(rng.integers(1, len(sentences)))
    a, b = np.concatenate(sentences[:pivot]), np.concatenate(sentences[pivot:])
    swapped = bool(rng.random() < 0.5)
    return (b, a, True) if swapped else (a, b, False)


def truncate_pair(
    a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Shorten A + B to max_tokens: one token at a time from the longer segment (B on ties), from
    its front or back with equal chance. Computed in closed form: how many tokens each side loses
    follows from the lengths alone; how many of those come off the front is Binomial(k, 1/2)."""
    excess = a.size + b.size - max_tokens
    if excess <= 0:
        return a, b, False
    gap = abs(a.size - b.size)
    first = min(excess, gap)
    rest = excess - first
    cut_a = (first if a.size > b.size else 0) + rest // 2
    cut_b = excess - cut_a
    return _cut(a, cut_a, rng), _cut(b, cut_b, rng), True


def _cut(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    if k == 0:
        return x
    front = int(rng.binomial(k, 0.5))
    return x[front : x.size - (k - front)]


class BertDataset(CachedDataset):
    """Map-style dataset of BERT samples (dicts of numpy arrays, see __getitem__) over documents
    `document_range` ([begin, end), None = all) of one indexed dataset: the `split` named in errors.

    num_samples None walks the documents once; otherwise epochs are walked until the mapping holds
    at least num_samples rows (as Megatron, len() may exceed num_samples by part of an epoch).
    Constructed like GPTDataset, so the same blending and split code can build either.
    """

    cache_kind = "BertDataset"
    index_names = INDEX_NAMES

    def __init__(
        self,
        indexed_dataset: Any,
        tokenizer: Any,
        split: str,
        document_range: tuple[int, int] | None,
        num_samples: int | None,
        config: BertDatasetConfig,
        group: Any = None,
    ) -> None:
        self.indexed = indexed_dataset
        self.tokenizer = tokenizer
        self.split = split
        self.config = config
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"the {split} split: num_samples={num_samples} must be >= 1 (or None for one epoch)")
        self.num_samples = num_samples
        self._ids = bert_special_ids(tokenizer)
        self.masker = Masker(
            config.masking(),
            tokenizer.vocab_size,
            self._ids["mask"],
            self._ids.values(),
            tokenizer.continuation_mask() if config.whole_word else None,
        )
        self.document_range = check_document_range(document_range, len(indexed_dataset.document_indices) - 1,
                                                    f"the {split} split of {indexed_dataset.path_prefix}")
        self._cache_split_indices(indexed_dataset.path_prefix, split, self.document_range, num_samples,
                                  config.index_description(), config.cache, group)

    def _set_indices(self, arrays: dict[str, np.ndarray]) -> None:
        self.mapping = arrays["mapping"]
        self.mapping_info = dict(zip(COUNT_NAMES, (int(c) for c in arrays["document_counts"])))

    def __len__(self) -> int:
        return int(self.mapping.shape[0])

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        """text, types, labels (-1 = not predicted), is_random (SOP label), loss_mask,
        padding_mask (1 = real token), truncated; all int64 numpy (scalars as 0-d arrays)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for a BertDataset of {n} samples")
        idx %= n
        first, end, target = (int(v) for v in self.mapping[idx])
        rng = np.random.default_rng((self.config.seed, idx))
        sentences = [np.asarray(self.indexed[i], dtype=np.int64) for i in range(first, end)]
        a, b, swapped = split_pair(sentences, self.config.binary_head, rng)
        a, b, truncated = truncate_pair(a, b, target, rng)
        tokens, types = self._assemble(a, b)
        masked = self.masker(tokens, rng)
        return self._pad(masked.tokens, types, masked.labels, masked.loss_mask, swapped, truncated)

    def _assemble(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cls, sep = self._ids["cls"], self._ids["sep"]
        parts = [[cls], a, [sep]] + ([b, [sep]] if b.size else [])
        tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        types = np.zeros(tokens.size, dtype=np.int64)
        types[a.size + 2 :] = 1
        return tokens, types

    def _pad(self, tokens, types, labels, loss_mask, swapped: bool, truncated: bool) -> dict[str, np.ndarray]:
        L, n = self.config.seq_length, tokens.size
        if n > L:
            raise AssertionError(f"sample of {n} tokens exceeds seq_length {L}: mapping target too long")

        def pad(x: np.ndarray, value: int) -> np.ndarray:
            out = np.full(L, value, dtype=np.int64)
            out[:n] = x
            return out

        padding_mask = np.zeros(L, dtype=np.int64)
        padding_mask[:n] = 1
        return {
            "text": pad(tokens, self._ids["pad"]),
            "types": pad(types, 0),
            "labels": pad(labels, -1),
            "is_random": np.array(int(swapped), dtype=np.int64),
            "loss_mask": pad(loss_mask, 0),
            "padding_mask": padding_mask,
            "truncated": np.array(int(truncated), dtype=np.int64),
        }

    def _build(self) -> dict[str, np.ndarray]:
        begin, end = self.document_range
        c = self.config
        mapping, info = build_mapping(
            self.indexed.document_indices[begin : end + 1],
            self.indexed.sequence_lengths,
            max_length=c.seq_length - 3,
            short_seq_prob=c.short_seq_prob,
            seed=c.seed,
            binary_head=c.binary_head,
            num_samples=self.num_samples,
            long_sentence_len=c.long_sentence_len,
        )
        if mapping.shape[0] == 0:
            need = "2 sentences (binary_head on)" if c.binary_head else "1 sentence"
            raise DataError(
                f"the {self.split} split of {self.indexed.path_prefix}, "
                f"documents [{begin}, {end}): no usable document (each needs at least {need} and, with more than "
                f"one sentence, none longer than long_sentence_len={c.long_sentence_len} tokens). "
                f"Skipped: {info['empty_documents']} empty, {info['short_documents']} too short, "
                f"{info['long_sentence_documents']} with a long sentence. Was the corpus preprocessed "
                "with --split-sentences?"
            )
        return {"mapping": mapping, "document_counts": np.array([info[n] for n in COUNT_NAMES], dtype=np.int64)}


def bert_special_ids(tokenizer: Any) -> dict[str, int]:
    """The [CLS], [SEP], [MASK] and [PAD] ids BERT samples need; DataError naming the tokenizer
    types that have them when this tokenizer lacks any."""
    ids = {name: getattr(tokenizer, name, None) for name in ("cls", "sep", "mask", "pad")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise DataError(
            f"--model bert needs [CLS], [SEP], [MASK] and [PAD] ids; tokenizer "
            f"{getattr(tokenizer, 'name', type(tokenizer).__name__)} has none for {missing}: use --tokenizer-type BertWordPieceLowerCase or BertWordPieceCase "
            "(with --vocab-file), or HuggingFaceTokenizer with a tokenizer.json that defines them"
        )
    return {k: int(v) for k, v in ids.items()}


if __name__ == "__main__":  # the documented `python -m megapre.data.bert_dataset ... --show N`
    from megapre.cli.bert_samples import main

    sys.exit(main())
