"""Sharding and resume: input FILES are split across processes (or machines) deterministically;
each shard writes its own outputs and, last, its stats file, which marks it finished. A rerun skips
a shard whose stats file records the same inputs and settings."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from megapre.data.preprocess.readers import InputFile


@dataclass(frozen=True)
class ShardSpec:
    index: int
    count: int

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def tag(self) -> str:
        return f"shard{self.index:05d}-of-{self.count:05d}"


def resolve_shard(index: int | None, count: int | None,
                  env: Mapping[str, str] = os.environ) -> ShardSpec:
    """--shard-index/--num-shards, defaulting to torchrun's RANK/WORLD_SIZE when both flags are
    absent. Raises ValueError naming the flag (or variable) that is wrong."""
    if index is None and count is None and "WORLD_SIZE" in env:
        try:
            count, index = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        except ValueError as e:
            raise ValueError(f"RANK/WORLD_SIZE must be integers (got RANK={env.get('RANK')!r}, "
                             f"WORLD_SIZE={env.get('WORLD_SIZE')!r})") from e
        source = "RANK/WORLD_SIZE"
    else:
        source = "--shard-index/--num-shards"
        if count is None:
            if index not in (None, 0):
                raise ValueError("--shard-index needs --num-shards")
            count = 1
        index = 0 if index is None else index
    if count < 1:
        raise ValueError(f"{source}: the number of shards must be >= 1 (got {count})")
    if not 0 <= index < count:
        raise ValueError(f"{source}: shard index {index} is outside 0..{count - 1}")
    return ShardSpec(index, count)


def assign_files(files: Sequence[InputFile], spec: ShardSpec) -> list[InputFile]:
    """This shard's files, in input order. Files go largest first to the least-loaded shard (ties:
    lower shard, then input order), so shards get similar byte counts; the result depends only on
    the file list (paths and sizes), never on timing, so every process computes the same split."""
    if spec.count == 1:
        return list(files)
    load = [0] * spec.count
    owner = [0] * len(files)
    order = sorted(range(len(files)), key=lambda i: (-files[i].size, i))
    for i in order:
        shard = min(range(spec.count), key=lambda s: (load[s], s))
        owner[i] = shard
        load[shard] += max(files[i].size, 1)
    return [f for i, f in enumerate(files) if owner[i] == spec.index]


def run_prefix(output_prefix: str, spec: ShardSpec) -> str:
    """Prefix of this shard's outputs: PREFIX, or PREFIX_shard00003-of-00008."""
    return f"{output_prefix}_{spec.tag()}" if spec.sharded else output_prefix


def dataset_prefix(prefix: str, key: str, split_sentences: bool) -> str:
    """Megatron's output naming: PREFIX_{key}_document, or _sentence with --split-sentences."""
    return f"{prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def stats_path(prefix: str) -> Path:
    return Path(f"{prefix}.stats.json")


def errors_path(prefix: str) -> Path:
    return Path(f"{prefix}.errors.jsonl")


def load_stats(prefix: str) -> dict[str, Any] | None:
    """The stats of a finished run at `prefix`, or None (absent, or unreadable: treated as not
    finished, so the run is redone)."""
    path = stats_path(prefix)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("complete") is True else None


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Names of the fingerprint fields that differ (empty: same inputs and settings)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def finished_shards(output_prefix: str, count: int) -> list[int]:
    return [i for i in range(count)
            if load_stats(run_prefix(output_prefix, ShardSpec(i, count))) is not None]


def merge_command(output_prefix: str, keys: Sequence[str], split_sentences: bool,
                  count: int) -> list[str]:
    """Shell lines that join the shards of each key into PREFIX_{key}_document."""
    lines = []
    for key in keys:
        parts = " ".join(dataset_prefix(run_prefix(output_prefix, ShardSpec(i, count)), key,
                                        split_sentences) for i in range(count))
        out = dataset_prefix(output_prefix, key, split_sentences)
        lines.append(f"python tools/merge_datasets.py --input {parts} --output-prefix {out}")
    return lines
