"""Finding the stats file that describes an indexed dataset, so training can check it against the
run (tokenizer fingerprint, sentence splitting) without the user naming it.

Two writers: preprocessing writes RUN.stats.json for its datasets RUN_{key}_document (or
_sentence) and lists them under "outputs"; tools/merge_datasets.py writes PREFIX.stats.json beside
its output PREFIX. A dataset made elsewhere (Megatron's tools) has none: None is returned.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATS_SUFFIX = ".stats.json"


def sidecar_path(prefix: str | os.PathLike) -> Path:
    """The stats file a merge writes beside its output dataset."""
    return Path(f"{os.fspath(prefix)}{STATS_SUFFIX}")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _lists(stats: dict[str, Any], name: str) -> bool:
    outputs = stats.get("outputs")
    if not isinstance(outputs, dict):
        return False
    return any(isinstance(o, dict) and os.path.basename(str(o.get("prefix", ""))) == name
               for o in outputs.values())


def find_dataset_stats(prefix: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """(path, contents) of the stats file describing dataset `prefix`, or None. Candidates: the
    merge sidecar PREFIX.stats.json, then HEAD.stats.json for every HEAD that `prefix` starts with
    up to an underscore (RUN of RUN_{key}_document, whatever underscores the key holds), the file
    counting only if its "outputs" name this dataset."""
    prefix = os.fspath(prefix)
    side = _read(sidecar_path(prefix))
    if side is not None and side.get("kind") == "merge":
        return sidecar_path(prefix), side
    directory, name = os.path.split(prefix)
    for i in (i for i, ch in enumerate(name) if ch == "_" and i > 0):
        path = Path(directory or ".") / f"{name[:i]}{STATS_SUFFIX}"
        stats = _read(path) if path.is_file() else None
        if stats is not None and _lists(stats, name):
            return path, stats
    return None


def recorded_split_sentences(stats: dict[str, Any]) -> bool | None:
    """Whether the dataset was made with --split-sentences, as its stats say (None: unknown)."""
    if isinstance(stats.get("split_sentences"), bool):
        return stats["split_sentences"]
    args = stats.get("args")
    value = args.get("split_sentences") if isinstance(args, dict) else None
    return value if isinstance(value, bool) else None


def merged_stats(inputs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The stats file of a merge of `inputs`: their tokenizer when every input's stats record the
    same fingerprint (else None), and their sentence splitting when all agree; plus a line per
    input whose recorded tokenizer differs from the first one's (empty: they agree)."""
    found = [find_dataset_stats(p) for p in inputs]
    tokenizers = [f[1].get("tokenizer") if f else None for f in found]
    prints = [t.get("fingerprint") if isinstance(t, dict) else None for t in tokenizers]
    conflicts = [f"{p} (tokenizer {str(fp)[:12]})" for p, fp in zip(inputs, prints)
                 if fp is not None and prints[0] is not None and fp != prints[0]]
    agree = prints[0] is not None and all(fp == prints[0] for fp in prints)
    splits = {recorded_split_sentences(f[1]) if f else None for f in found}
    return {"complete": True, "kind": "merge", "inputs": list(inputs),
            "tokenizer": tokenizers[0] if agree else None,
            "split_sentences": splits.pop() if len(splits) == 1 else None}, conflicts
