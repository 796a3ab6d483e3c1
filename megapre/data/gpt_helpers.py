"""Python face of csrc/data/gpt_helpers.cpp (megapre._C.data), with numpy references.

The compiled builders are the ones used; the references define the results (tests compare the
two, and megatron-core's helpers) and stand in, with one warning, when megapre._C is not built.
MEGAPRE_REQUIRE_COMPILED=1 turns that fallback into an error.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import numpy as np

BUILD_HINT = (
    "build megapre's C++ helpers with `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace`) in the megapre source tree"
)


@functools.cache
def compiled() -> ModuleType | None:
    """megapre._C.data, or None (with one warning) when the extension is not built."""
    try:
        importlib.import_module("torch")  # loads libc10/libtorch that megapre._C links against
        module = importlib.import_module("megapre._C").data
        module.build_sample_idx  # noqa: B018  (an older build without the GPT helpers)
        return module
    except (ImportError, OSError, AttributeError) as e:
        if os.environ.get("MEGAPRE_REQUIRE_COMPILED", "0") == "1":
            raise ImportError(f"megapre._C.data is unavailable ({e}); {BUILD_HINT}") from e
        warnings.warn(
            f"megapre: compiled dataset helpers unavailable ({e}); using numpy references, which "
            f"are slower for blends; {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    """int64 [num_samples + 1, 2]: row k = (position in doc_idx, offset) where sample k starts;
    sample k is the seq_length + 1 tokens from row k to row k+1's token inclusive."""
    # IndexedDataset's lengths sit at byte 34 of the .idx map, i.e. misaligned for int32: copy
    # them to an aligned buffer (C++ may use aligned vector loads).
    sizes = np.require(sizes, np.int32, ["C_CONTIGUOUS", "ALIGNED"])
    if doc_idx.dtype not in (np.int32, np.int64):
        doc_idx = doc_idx.astype(np.int64)
    doc_idx = np.require(doc_idx, None, ["C_CONTIGUOUS", "ALIGNED"])
    module = compiled()
    if module is None:
        return sample_idx_reference(sizes, doc_idx, seq_length)
    return module.build_sample_idx(sizes, doc_idx, int(seq_length))


def build_blending_indices(weights: np.ndarray, size: int,
                           megatron_compatible: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16[size], dataset_sample_index int64[size]) for normalized weights."""
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    module = compiled()
    if module is None:
        return blending_indices_reference(weights, size, megatron_compatible)
    return module.build_blending_indices(weights, int(size), bool(megatron_compatible))


def sample_idx_reference(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    """Vectorized definition: sample k starts at stream position k * seq_length, in the
    document (of the doc_idx stream) that contains that position."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if doc_idx.size and (doc_idx.min() < 0 or doc_idx.max() >= len(sizes)):
        raise ValueError(f"doc_idx holds values outside [0, {len(sizes)})")
    lengths = sizes[doc_idx].astype(np.int64)
    if (lengths < 0).any():
        raise ValueError("sizes holds negative lengths")
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if ends.size else 0
    num_samples = (total - 1) // seq_length if total > 0 else 0
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, starts, side="right")
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    out[1:, 0] = pos
    out[1:, 1] = starts - (ends[pos] - lengths[pos])
    return out


def blending_indices_reference(weights: np.ndarray, size: int,
                               megatron_compatible: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pure-Python definition of the greedy blend (see csrc/data/gpt_helpers.cpp for the rule)."""
    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    if n < 1 or n > 32767 or (w < 0).any() or not np.isfinite(w).all() or abs(w.sum() - 1) > 1e-6:
        raise ValueError("weights must be 1..32767 finite non-negative numbers summing to 1")
    count = np.zeros(n, dtype=np.int64)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    b = 1.0 / (2.0 * (n - 1)) if n > 1 else 0.0
    for s in range(size):
        if megatron_compatible:
            best = int(np.argmax(w * max(s, 1) - count))
        elif n == 1:
            best = 0
        else:
            lag = w * (s + 1) - count
            eligible = (w > 0) & (lag >= b)
            if eligible.any():
                deadline = np.where(eligible, (count + 1 - b) / np.where(w > 0, w, 1.0), np.inf)
                best = int(np.argmin(deadline))
            else:
                best = int(np.argmax(lag))
        dataset_index[s] = best
        sample_index[s] = count[best]
        count[best] += 1
    return dataset_index, sample_index
