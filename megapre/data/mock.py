"""Megatron's --mock-data for GPT: a synthetic corpus instead of --data-path, for trying a
launch line (throughput, memory, layouts) before any data is preprocessed.

The corpus follows megatron-core's mock GPT dataset: document lengths drawn uniformly from
[1, 4096) with seed 0, each document the ids 1, 2, ..., length-1 followed by end-of-document
(wrapped into the vocabulary when it is smaller). It is written as a real indexed dataset, so
the run takes the exact path of real data (sample index, shuffling, epochs, loaders); 1,000
documents (about 2M tokens, 8 MB) are repeated over as many epochs as the run needs.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .indexed import IndexedDataset, IndexedDatasetBuilder, optimal_dtype

MAX_DOCUMENT_LENGTH = 4096
NUM_DOCUMENTS = 1000


def mock_document(length: int, vocab_size: int, eod: int) -> np.ndarray:
    body = (np.arange(length - 1, dtype=np.int64) % max(vocab_size - 1, 1)) + 1
    return np.concatenate([body, [eod]]).astype(np.int64)


def write_mock_corpus(directory: str | os.PathLike, vocab_size: int, eod: int) -> str:
    """The mock corpus as `directory/mock_gpt_v{vocab}_e{eod}` (written once, then reused);
    returns its path prefix."""
    prefix = str(Path(directory) / f"mock_gpt_v{vocab_size}_e{eod}")
    if IndexedDataset.exists(prefix):
        return prefix
    lengths = np.random.RandomState(0).randint(1, MAX_DOCUMENT_LENGTH, size=NUM_DOCUMENTS)
    with IndexedDatasetBuilder(prefix, optimal_dtype(max(vocab_size, eod + 1))) as builder:
        for length in lengths:
            builder.add_document(mock_document(int(length), vocab_size, eod))
    return prefix


def mock_directory(data_cache_path: str | None) -> str:
    """Where the mock corpus goes: --data-cache-path (shared by the run's ranks) or, without
    one, a directory of this process's own."""
    if data_cache_path:
        path = Path(data_cache_path) / "mock"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    return tempfile.mkdtemp(prefix="megapre-mock-")
