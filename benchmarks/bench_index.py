"""Index-building benchmark: GPT document/sample/shuffle indices for a synthetic 1e9-token dataset.

Only the sequence lengths matter to the indices, so the dataset is a sizes array (log-normal
document lengths, mean 600 tokens by default) and no .bin is written. Times each phase of
megapre.data.gpt_dataset.build_gpt_indices (the function GPTDataset runs on a cache miss), writing
the cache entry, and megatron-core's build_sample_idx on the same document index for comparison.
Target (issue 3): all three indices in < 30 s.

    python benchmarks/bench_index.py [--tokens 1e9] [--seq-length 2048] [--epochs 1.0] [--mean-doc-tokens 600]
"""
from __future__ import annotations

import argparse
import importlib.util
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megapre.data import gpt_helpers  # noqa: E402
from megapre.data.gpt_dataset import (  # noqa: E402
    build_document_index, build_gpt_indices, build_shuffle_index, num_epochs_needed,
)
from megapre.data.index_cache import IndexCache  # noqa: E402


def synthetic_sizes(tokens: int, mean_doc_tokens: float, seed: int = 0) -> np.ndarray:
    """Log-normal document lengths (sigma 1) with the given mean, summing to ~tokens."""
    rng = np.random.default_rng(seed)
    mu = np.log(mean_doc_tokens) - 0.5
    sizes = np.clip(rng.lognormal(mu, 1.0, size=int(tokens / mean_doc_tokens * 1.1)), 1, 1_000_000).astype(np.int32)
    cut = int(np.searchsorted(np.cumsum(sizes, dtype=np.int64), tokens))
    return np.ascontiguousarray(sizes[: cut + 1])


def megatron_sample_idx():
    spec = importlib.util.find_spec("megatron")
    if spec is None:
        return None
    for root in spec.submodule_search_locations or []:
        for path in glob.glob(os.path.join(root, "core", "datasets", "helpers_cpp*.so")):
            loader = importlib.util.spec_from_file_location("helpers_cpp", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
            return module
    return None


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--epochs", type=float, default=1.0, help="samples requested, in epochs (>1: multi-epoch)")
    p.add_argument("--mean-doc-tokens", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    if gpt_helpers.compiled() is None:
        sys.exit("megapre._C.data is not built; run `python setup.py build_ext --inplace` first")

    sizes = synthetic_sizes(int(args.tokens), args.mean_doc_tokens)
    units = np.arange(len(sizes), dtype=np.int64)
    tokens = int(sizes.sum(dtype=np.int64))
    per_epoch = (tokens - 1) // args.seq_length
    num_samples = int(per_epoch * args.epochs)
    print(f"dataset: {len(sizes):,d} documents, {tokens:,d} tokens; seq {args.seq_length}; "
          f"{num_samples:,d} samples requested ({args.epochs} epochs)")

    epochs = num_epochs_needed(tokens, num_samples, args.seq_length)
    rng = np.random.RandomState(args.seed)
    doc_idx, t_doc = timed(lambda: build_document_index(units, epochs, rng, False))
    sample_idx, t_sample = timed(lambda: gpt_helpers.build_sample_idx(sizes, doc_idx, args.seq_length))
    _, t_shuffle = timed(lambda: build_shuffle_index(len(sample_idx) - 1, len(sample_idx) - 1, rng))
    arrays, t_all = timed(lambda: build_gpt_indices(sizes, units, num_samples, args.seq_length, args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        entry = IndexCache(tmp, "GPTDataset", {"bench": True}, tuple(arrays))
        _, t_save = timed(lambda: entry.save(arrays))
        _, t_load = timed(lambda: [np.asarray(a).sum() for a in entry.load().values()])

    rows = [("document index (numpy RandomState shuffle)", t_doc), ("sample index (C++)", t_sample),
            ("shuffle index", t_shuffle), ("all three: build_gpt_indices", t_all),
            ("write cache entry (3 .npy, fsync)", t_save), ("load cache entry (mmap + touch)", t_load)]
    helpers = megatron_sample_idx()
    if helpers is not None:
        doc32 = doc_idx.astype(np.int32)
        theirs, t_meg = timed(lambda: helpers.build_sample_idx_int64(sizes, doc32, args.seq_length, 1,
                                                                     int(sizes[doc32].sum(dtype=np.int64)), True, 1))
        same = bool(np.array_equal(theirs, sample_idx))
        rows.append((f"megatron-core build_sample_idx, same doc index (equal: {same})", t_meg))
    width = max(len(r[0]) for r in rows)
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds:8.3f} s")
    print(f"samples built: {len(arrays['sample_index']) - 1:,d}; epochs: {epochs}; "
          f"target < 30 s: {'PASS' if t_all < 30 else 'FAIL'} ({t_all:.2f} s)")


if __name__ == "__main__":
    main()
