"""Finding corpus files: the one answer to "which files does --input name?", shared by
preprocessing (megapre.data.preprocess) and tokenizer training (megapre.data.tokenizer.corpus).

--input values are files, globs or directories (searched recursively). Directory and glob matches
keep only files whose name tells a known format (JSONL, text, Parquet; .gz/.zst wrappers) and skip
hidden names and preprocessing's own side outputs (PREFIX.stats.json, PREFIX.errors.jsonl), which
are run reports, not corpus text. A file named explicitly is always taken.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Sequence

FORMATS = ("jsonl", "text", "parquet")
INPUT_FORMATS = ("auto", *FORMATS)
TEXT_MODES = ("line", "blank-line")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
SIDE_OUTPUTS = (".stats.json", ".errors.jsonl")   # run artifacts: not corpus in a dir/glob match


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str          # one of FORMATS
    compression: str     # "none" | "gzip" | "zstd"
    size: int            # bytes on disk


def detect_format(path: str, input_format: str = "auto") -> tuple[str, str] | None:
    """(format, compression) of `path`; None when `auto` cannot tell from the name."""
    name = path.lower()
    compression = "none"
    for suffix, kind in COMPRESSION.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
            break
    if input_format != "auto":
        if input_format == "parquet" and compression != "none":
            raise ValueError(f"{path}: Parquet files are compressed internally; a {compression} "
                             "wrapper is not supported, decompress the file first")
        return input_format, compression
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(TEXT_SUFFIXES):
        return "text", compression
    if name.endswith(".parquet") and compression == "none":
        return "parquet", compression
    return None


def is_side_output(path: str) -> bool:
    """A file preprocessing writes beside its outputs (PREFIX.stats.json, PREFIX.errors.jsonl)."""
    return path.endswith(SIDE_OUTPUTS)


def expand_inputs(patterns: Sequence[str], input_format: str = "auto") -> list[InputFile]:
    """Resolve --input values (files, globs, directories searched recursively) to a deduplicated,
    deterministic file list: patterns in the order given, matches of each in sorted order."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"--input-format {input_format!r}: choose from auto, {', '.join(FORMATS)}")
    files: list[InputFile] = []
    seen: set[str] = set()
    for pattern in patterns:
        for path in _matches(pattern, input_format):
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            kind = detect_format(path, input_format)
            if kind is None:
                raise ValueError(
                    f"--input {path}: cannot tell the format from the file name (known: "
                    f"{', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)}, .parquet, optionally + .gz/.zst);"
                    " pass --input-format jsonl|text|parquet")
            files.append(InputFile(path, kind[0], kind[1], os.path.getsize(path)))
    return files


def _matches(pattern: str, input_format: str) -> list[str]:
    if os.path.isdir(pattern):
        found = []
        for root, dirs, names in os.walk(pattern):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in names:
                path = os.path.join(root, name)
                if (not name.startswith(".") and not is_side_output(name)
                        and detect_format(path, input_format) is not None):
                    found.append(path)
        if not found:
            raise ValueError(f"--input {pattern}: directory holds no .jsonl/.json/.ndjson/.txt/"
                             ".parquet files (optionally .gz/.zst)")
        return sorted(found)
    if os.path.isfile(pattern):
        return [pattern]
    if glob.has_magic(pattern):
        found = sorted(p for p in glob.glob(pattern, recursive=True)
                       if os.path.isfile(p) and not is_side_output(p))
        if not found:
            raise ValueError(f"--input {pattern}: no such file, and no file matches it as a glob "
                             f"(the pattern matches no files under {os.path.dirname(pattern) or '.'})")
        return found
    raise ValueError(f"--input {pattern}: no such file or directory")
