"""Mixing corpora by weight, and the train/valid/test datasets of a run (GPT: build_gpt_datasets;
BERT: build_bert_datasets, one sentence-split corpus cut by --split).

`--data-path 0.3 A 0.7 B` (weights normalized; bare prefixes `A B` are weighted by their token
counts) with `--split 969,30,1`, or separate `--train-data-path/--valid-data-path/--test-data-path`
lists. Each split of each corpus is a GPTDataset sized with megatron-core's 0.5% surplus
(ceil(ceil(n * weight) * 1.005) samples), so the greedy blend never runs a corpus dry; the blend
itself (BlendedDataset) keeps every prefix within one sample of weight * length.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from megapre.data.bert_dataset import BertDataset, BertDatasetConfig
from megapre.data.errors import DataError
from megapre.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from megapre.data.gpt_helpers import build_blending_indices
from megapre.data.index_cache import CacheConfig, CachedDataset
from megapre.data.split import SPLIT_NAMES, parse_split, split_ranges

SURPLUS = 0.005  # megatron-core's mid_level_dataset_surplus
BLEND_NAMES = ("dataset_index", "dataset_sample_index")


def parse_blend(args: Sequence[str], flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
    """`["0.3", "A", "0.7", "B"]` -> (["A", "B"], [0.3, 0.7]); `["A", "B"]` -> (["A", "B"], None)."""
    args = [a for a in args if a.strip()]
    if not args:
        raise ValueError(f"{flag}: no dataset given; pass a path prefix (P for P.bin/P.idx)")
    numeric = [_as_weight(a) is not None for a in args]
    if not any(numeric):
        return list(args), None
    if len(args) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise ValueError(
            f"{flag} {' '.join(args)}: give either prefixes only (A B C, weighted by their token "
            "counts) or weight/prefix pairs (0.3 A 0.7 B)"
        )
    weights = [float(a) for a in args[0::2]]
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"{flag}: weights must be finite and >= 0, got {weights}")
    if sum(weights) <= 0:
        raise ValueError(f"{flag}: weights sum to 0; give at least one positive weight")
    return list(args[1::2]), weights


def _as_weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def normalize(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def samples_per_dataset(num_samples: int, weights: Sequence[float], surplus: float = SURPLUS) -> list[int]:
    """Samples to request from each corpus for a blend of num_samples (Megatron's surplus rule)."""
    return [int(math.ceil(math.ceil(num_samples * w) * (1 + surplus))) for w in weights]


class BlendedDataset(CachedDataset):
    """Samples of several datasets interleaved by weight: item i is
    datasets[dataset_index[i]][dataset_sample_index[i]]. Cached beside the first dataset when
    every part has a cache description (GPTDataset, BertDataset), else built in memory."""

    cache_kind = "BlendedDataset"
    index_names = BLEND_NAMES

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int,
                 cache: CacheConfig, split: str = "train", megatron_compatible: bool = False,
                 group: Any = None) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"BlendedDataset: {len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize(weights)
        self.size = int(size)
        self.split = split
        self.megatron_compatible = megatron_compatible
        descriptions = [getattr(d, "description", None) for d in self.datasets]
        description = {"class": "BlendedDataset", "split": split, "size": self.size,
                       "weights": self.weights, "datasets": descriptions,
                       "rule": "megatron" if megatron_compatible else "exact"}
        cacheable = all(d is not None for d in descriptions)
        prefix = descriptions[0]["dataset"]["path_prefix"] if cacheable else None
        self._cache_indices(prefix, description, cache, group)
        self._check_sizes()

    def _build(self) -> dict[str, np.ndarray]:
        di, dsi = build_blending_indices(np.asarray(self.weights), self.size, self.megatron_compatible)
        return {"dataset_index": di, "dataset_sample_index": dsi}

    def _check_sizes(self) -> None:
        counts = np.bincount(np.asarray(self.dataset_index), minlength=len(self.datasets))
        for i, (d, need) in enumerate(zip(self.datasets, counts)):
            if need > len(d):
                source = getattr(getattr(d, "indexed", None), "path_prefix", type(d).__name__)
                raise ValueError(
                    f"{self.split} blend: dataset {i} ({source}) has {len(d)} samples but the blend of "
                    f"{self.size} needs {int(need)}; build it with more (see samples_per_dataset)"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Any:
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size} ({self.split} split)")
        idx %= self.size
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


@dataclass
class BlendConfig:
    """Which corpora feed which split (Megatron flags).

    data_path [--data-path]: weighted or bare prefixes, cut by `split` [--split].
    train/valid/test_data_path [--train-data-path ...]: separate corpora per split (used instead
      of data_path + split for the splits they name).
    megatron_compatible_blend: reproduce megatron-core's blend order exactly (its rule can drift
      up to ~1.7 samples from the weights with 3+ corpora); default keeps every prefix within 1.
    """

    data_path: list[str] | None = None
    split: str = "969,30,1"
    train_data_path: list[str] | None = None
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None
    megatron_compatible_blend: bool = False

    def sources(self) -> dict[str, tuple[list[str], list[float] | None, bool, str]]:
        """split name -> (prefixes, weights, whether --split cuts them, flag) for each split fed."""
        out = {}
        separate = {"train": self.train_data_path, "valid": self.valid_data_path, "test": self.test_data_path}
        for name in SPLIT_NAMES:
            if separate[name]:
                flag = f"--{name}-data-path"
                out[name] = (*parse_blend(separate[name], flag), False, flag)
            elif self.data_path:
                out[name] = (*parse_blend(self.data_path), True, "--data-path")
        if not out:
            raise DataError("no data: pass --data-path (with --split) or --train-data-path/--valid-data-path/--test-data-path")
        return out


Opener = Callable[[str], Any]


def _default_opener(prefix: str) -> Any:
    from megapre.data.indexed import IndexedDataset

    return IndexedDataset(prefix)


def build_gpt_datasets(blend: BlendConfig, gpt: GPTDatasetConfig, num_samples: Sequence[int | None],
                       open_dataset: Opener | None = None, group: Any = None,
                       wrap: Callable[[GPTDataset], Any] | None = None,
                       ) -> dict[str, GPTDataset | BlendedDataset | None]:
    """The train/valid/test datasets of a run. num_samples: samples wanted per split (Megatron's
    train_valid_test_num_samples); 0 or a split with no share in --split gives None. `wrap`
    turns each corpus's GPTDataset into the dataset blended (FIM samples: megapre.data.fim)."""
    fractions = parse_split(blend.split)
    open_dataset = open_dataset or _default_opener
    opened: dict[str, Any] = {}
    result: dict[str, GPTDataset | BlendedDataset | None] = {n: None for n in SPLIT_NAMES}
    for name, (prefixes, weights, cut, flag) in _fed_splits(blend, num_samples):
        which = SPLIT_NAMES.index(name)
        want = num_samples[which]
        datasets = [opened[p] if p in opened else opened.setdefault(p, _open(p, flag, open_dataset))
                    for p in prefixes]
        num_docs = [len(d.document_indices) - 1 for d in datasets]
        ranges = [split_ranges(fractions, n)[which] if cut else (0, n) for n in num_docs]
        if any(r is None for r in ranges):
            continue  # --split gives this split no share
        if weights is None and len(datasets) == 1:
            weights = [1.0]
        elif weights is None:
            weights = [_tokens_in(d, r) for d, r in zip(datasets, ranges)]
            if sum(weights) == 0:
                raise DataError(f"the {name} split of {', '.join(prefixes)} is empty (no tokens in its "
                                 f"documents); give it a larger share in --split or more data")
        weights = normalize(weights)
        result[name] = _split_dataset(name, datasets, ranges, weights, want, blend, gpt, group,
                                      wrap or (lambda d: d))
    return result


def build_bert_datasets(blend: BlendConfig, bert: BertDatasetConfig, tokenizer: Any,
                        num_samples: Sequence[int | None], open_dataset: Opener | None = None,
                        group: Any = None) -> dict[str, BertDataset | None]:
    """The train/valid/test BERT datasets over one sentence-level dataset (PREFIX_text_sentence),
    cut by --split. num_samples as in build_gpt_datasets; 0 or no share in --split gives None."""
    paths = blend.data_path or blend.train_data_path or []
    prefixes = [p for p in paths if _as_weight(p) is None]
    if len(prefixes) != 1 or blend.valid_data_path or blend.test_data_path:
        raise DataError("BERT pretraining reads one sentence-split dataset: --data-path "
                         "PREFIX_text_sentence (made by tools/preprocess_data.py --split-sentences)")
    indexed = (open_dataset or _default_opener)(prefixes[0])
    ranges = split_ranges(parse_split(blend.split), indexed.num_documents)
    return {name: None if (r is None or n == 0) else BertDataset(indexed, tokenizer, name, r, n, bert, group=group)
            for name, r, n in zip(SPLIT_NAMES, ranges, num_samples)}


def _fed_splits(blend: BlendConfig, num_samples: Sequence[int | None]):
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must give (train, valid, test), got {list(num_samples)}")
    for name, source in blend.sources().items():
        if num_samples[SPLIT_NAMES.index(name)] != 0:
            yield name, source


def _open(prefix: str, flag: str, open_dataset: Opener) -> Any:
    p = os.fspath(prefix)
    if not (os.path.isfile(p + ".idx") and os.path.isfile(p + ".bin")):
        raise FileNotFoundError(
            f"{flag} {p}: {p}.idx and {p}.bin must both exist (give the prefix, without .bin/.idx; "
            "tools/preprocess_data.py writes them)"
        )
    return open_dataset(p)


def _tokens_in(dataset: Any, document_range: tuple[int, int]) -> int:
    di = np.asarray(dataset.document_indices)
    lo, hi = document_range
    return int(np.asarray(dataset.sequence_lengths)[di[lo]:di[hi]].sum(dtype=np.int64))


def _split_dataset(name: str, datasets: list[Any], ranges: list[tuple[int, int]], weights: list[float],
                   want: int | None, blend: BlendConfig, gpt: GPTDatasetConfig, group: Any,
                   wrap: Callable[[GPTDataset], Any]) -> GPTDataset | BlendedDataset:
    if len(datasets) == 1:
        return wrap(GPTDataset(datasets[0], name, ranges[0], want, gpt, group))
    if want is None:
        raise ValueError(f"the {name} split blends {len(datasets)} datasets: give its number of samples")
    sizes = samples_per_dataset(want, weights)
    parts = [wrap(GPTDataset(d, name, r, n, gpt, group))
             for d, r, n, w in zip(datasets, ranges, sizes, weights) if w > 0]
    kept = [w for w in weights if w > 0]
    return BlendedDataset(parts, kept, want, gpt.cache, name, blend.megatron_compatible_blend, group)
