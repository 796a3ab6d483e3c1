"""BERT data benchmark: the sentence-pair mapping (C++) against megatron-core's build_mapping on
the same synthetic corpus (the rows must be equal), and BertDataset sample throughput.

Only sentence lengths matter to the mapping, so the corpus for it is a lengths array (documents of
0-19 sentences of 5-59 tokens). The throughput part writes a small indexed dataset of random
WordPiece ids and reads samples with the BERT vocabulary's special tokens (../shared/data/bert).

    python benchmarks/bench_bert.py [--documents 1000000] [--seq-length 512] [--samples 500]
"""
from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megapre.data.bert_dataset import BertDataset, BertDatasetConfig, build_mapping  # noqa: E402
from megapre.data.index_cache import CacheConfig  # noqa: E402
from megapre.data.indexed import IndexedDataset, IndexedDatasetBuilder  # noqa: E402


def megatron_helpers():
    """megatron-core's compiled helpers, loaded from the wheel without importing megatron.core."""
    spec = importlib.util.find_spec("megatron")
    for root in (spec.submodule_search_locations if spec else []):
        for path in glob.glob(str(Path(root) / "core" / "datasets" / "helpers_cpp*.so")):
            loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", path)
            module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("helpers_cpp", path, loader=loader))
            loader.exec_module(module)
            return module
    return None


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_mapping(num_docs: int, seq_length: int) -> None:
    rng = np.random.default_rng(0)
    docs = np.concatenate(([0], np.cumsum(rng.integers(0, 20, num_docs)))).astype(np.int64)
    lengths = rng.integers(5, 60, int(docs[-1])).astype(np.int32)
    ours_s, (ours, _) = best_of(lambda: build_mapping(docs, lengths, max_length=seq_length - 3, short_seq_prob=0.1,
                                                      seed=1234, binary_head=True, num_samples=None))
    print(f"mapping: {num_docs:,d} documents, {lengths.size:,d} sentences -> {len(ours):,d} samples")
    print(f"  megapre     {ours_s:.3f} s")
    helpers = megatron_helpers()
    if helpers is None:
        print("  megatron-core not installed: no comparison")
        return
    theirs_s, theirs = best_of(lambda: helpers.build_mapping(docs, lengths, 1, 2**62, seq_length - 3, 0.1, 1234, False, 2))
    assert np.array_equal(ours, theirs.astype(np.int64)), "mapping differs from megatron-core's"
    print(f"  megatron    {theirs_s:.3f} s  (rows identical; ratio {theirs_s / ours_s:.2f}x)")


class _Tokenizer:
    """The BERT vocabulary's ids, without loading the tokenizer library."""

    def __init__(self, vocab: Path) -> None:
        words = vocab.read_text(encoding="utf-8").splitlines()
        self.name, self.vocab_size = "bert-vocab", len(words)
        ids = {w: i for i, w in enumerate(words)}
        self.cls, self.sep, self.mask, self.pad = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"], ids["[PAD]"]
        self._cont = np.array([w.startswith("##") for w in words])

    def continuation_mask(self) -> np.ndarray:
        return self._cont


def bench_samples(seq_length: int, samples: int) -> None:
    vocab = ROOT.parent / "shared" / "data" / "bert" / "vocab.txt"
    if not vocab.exists():
        print(f"samples: skipped ({vocab} not found)")
        return
    tok = _Tokenizer(vocab)
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "random_text_sentence"
        with IndexedDatasetBuilder(prefix, np.uint16) as builder:
            for _ in range(4000):
                lens = rng.integers(8, 40, int(rng.integers(2, 30)))
                builder.add_document(rng.integers(1000, tok.vocab_size, int(lens.sum())), lens.tolist())
            builder.finalize()
        indexed = IndexedDataset(prefix)
        for ngrams in (1, 3):
            cfg = BertDatasetConfig(seq_length=seq_length, max_ngrams=ngrams, cache=CacheConfig(enabled=False))
            ds = BertDataset(indexed, tok, "train", None, None, cfg)
            n = min(samples, len(ds))
            t0 = time.perf_counter()
            for i in range(n):
                ds[i]
            dt = time.perf_counter() - t0
            print(f"samples: seq {seq_length}, whole words, max_ngrams {ngrams}: {n / dt:,.0f} samples/s "
                  f"({dt / n * 1e3:.2f} ms each, one process)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--documents", type=int, default=1_000_000)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--samples", type=int, default=500)
    args = p.parse_args()
    bench_mapping(args.documents, args.seq_length)
    bench_samples(args.seq_length, args.samples)


if __name__ == "__main__":
    main()
