"""Checks of a run's datasets against its tokenizer, done when the datasets are opened (training
start), so a mismatch fails in seconds with one line instead of training on garbage (loss ~10.8)
or crashing at the first forward pass.

- fingerprint: the tokenizer fingerprint the dataset's stats file recorded (preprocessing, merge)
  must equal the run's; --allow-tokenizer-mismatch turns the error into a warning.
- ids: a sample of the .bin must hold ids inside the vocabulary (catches data without a stats file,
  e.g. made by Megatron's tools, and dtypes that cannot hold the ids: int16 reads 40000 as -25536).
- sentences (BERT): the data must be sentence-split (--split-sentences).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from megapre.data.errors import DataError
from megapre.data.notify import warn
from megapre.data.stats_file import find_dataset_stats, recorded_split_sentences

OVERRIDE = "pass --allow-tokenizer-mismatch to train anyway"


@dataclass
class DataCheckConfig:
    allow_tokenizer_mismatch: bool = False   # --allow-tokenizer-mismatch: warn instead of failing
    need_sentences: bool = False             # BERT with the binary head: one sequence per sentence


def check_fingerprint(prefix: str, stats_path: Any, stats: dict[str, Any], tokenizer: Any,
                      allow: bool) -> None:
    """Refuse (or, when allowed, warn about) data recorded with another tokenizer."""
    recorded = stats.get("tokenizer")
    if not isinstance(recorded, dict) or not recorded.get("fingerprint"):
        return
    ours = tokenizer.fingerprint()
    if recorded["fingerprint"] == ours:
        return
    message = (f"--data-path {prefix}: made with tokenizer {recorded.get('type', '?')} (fingerprint "
               f"{str(recorded['fingerprint'])[:12]}, per {stats_path}) but this run uses "
               f"{tokenizer.name} (fingerprint {ours[:12]})")
    if allow:
        warn(f"{message}; training anyway (--allow-tokenizer-mismatch)")
        return
    raise DataError(f"{message}; {OVERRIDE}")


def check_token_ids(dataset: Any, vocab_size: int) -> None:
    """A sample of the dataset's tokens lies in [0, vocab_size); the error names the .bin file."""
    path = f"{dataset.path_prefix}.bin"
    if dataset.dtype.kind == "f":
        raise DataError(f"{path}: holds {dataset.dtype.name} values, not token ids (dtype code of "
                        f"{dataset.path_prefix}.idx); the file is corrupt or not a token dataset")
    sample = dataset.sample_tokens()
    if sample.size == 0:
        return
    lo, hi = int(sample.min()), int(sample.max())
    if lo >= 0 and hi < vocab_size:
        return
    bad = lo if lo < 0 else hi
    why = (" (negative: the .idx dtype cannot hold the ids; rebuild with the tokenizer's dtype)"
           if lo < 0 else " (the data was made with a larger vocabulary: another tokenizer?)")
    raise DataError(f"{path}: token id {bad} ({dataset.dtype.name}) is outside the tokenizer's "
                    f"vocabulary [0, {vocab_size}){why}")


def check_sentences(dataset: Any, stats: dict[str, Any] | None) -> None:
    """BERT reads sentence pairs: refuse data preprocessed without --split-sentences."""
    recorded = recorded_split_sentences(stats) if stats is not None else None
    one_per_doc = dataset.num_documents > 0 and len(dataset) == dataset.num_documents
    if recorded is False or (recorded is None and one_per_doc):
        raise DataError(
            f"--data-path {dataset.path_prefix}: --model bert needs sentence-split data, but this "
            f"dataset holds one sequence per document ({dataset.num_documents:,} documents); "
            "rerun tools/preprocess_data.py with --split-sentences and train on PREFIX_text_sentence "
            "(or pass --no-bert-binary-head to train without sentence pairs)")


class CheckedOpener:
    """Opens each --data-path prefix of a run (once) and checks it against the run's tokenizer."""

    def __init__(self, tokenizer: Any, config: DataCheckConfig) -> None:
        self.tokenizer, self.config = tokenizer, config

    def __call__(self, prefix: str) -> Any:
        from megapre.data.indexed import IndexedDataset

        prefix = os.fspath(prefix)
        dataset = IndexedDataset(prefix)
        found = find_dataset_stats(prefix)
        if found is not None:
            check_fingerprint(prefix, found[0], found[1], self.tokenizer,
                              self.config.allow_tokenizer_mismatch)
        check_token_ids(dataset, self.tokenizer.vocab_size)
        if self.config.need_sentences:
            check_sentences(dataset, found[1] if found is not None else None)
        return dataset
