"""Worker side of reading: a raw batch of bytes (or Parquet column values) -> validated texts, one
per record and key, with 1-based line numbers; every record that cannot be a document becomes a
(line, reason, detail) skip instead of an exception."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

from megapre.data.preprocess.readers import RawBatch

try:  # orjson is ~3x faster than json on JSONL records; json is the always-available fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    _orjson = None


@dataclass
class Records:
    """Parsed batch: texts[i][k] is key k of record i, lines[i] its 1-based line; skips are
    (line, reason, detail) for the records dropped."""

    texts: list[tuple[str, ...]]
    lines: list[int]
    skips: list[tuple[int, str, str]]


def parse_batch(batch: RawBatch, keys: Sequence[str]) -> Records:
    if batch.kind == "jsonl":
        return _parse_jsonl(batch.payload, batch.first_line, keys)
    if batch.kind == "text-line":
        return _parse_text_lines(batch.payload, batch.first_line)
    if batch.kind == "text-block":
        return _parse_text_blocks(batch.payload, batch.first_line)
    if batch.kind == "parquet":
        return _parse_columns(batch.payload, batch.first_line, keys)
    raise ValueError(f"unknown batch kind {batch.kind!r}")


def _decode_lines(payload: bytes, first_line: int) -> list[str | UnicodeDecodeError]:
    """Lines of the chunk (without the newline; a final newline ends the last line, it does not
    start an empty one). One decode for the whole chunk; per line only when it has bad UTF-8.
    A UTF-8 byte-order mark opening the file (Windows editors write one) is dropped."""
    if first_line == 1 and payload.startswith(b"\xef\xbb\xbf"):
        payload = payload[3:]
    if payload.endswith(b"\n"):
        payload = payload[:-1]
    try:
        return payload.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        pass
    out: list[str | UnicodeDecodeError] = []
    for raw in payload.split(b"\n"):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            out.append(e)
    return out


def _utf8_detail(e: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 byte 0x{e.object[e.start]:02x} at byte {e.start} of the line"


if _orjson is not None:
    _loads = _orjson.loads
    _JSONError: tuple[type[Exception], ...] = (_orjson.JSONDecodeError,)
else:  # pragma: no cover
    _loads = json.loads
    _JSONError = (json.JSONDecodeError, RecursionError)

_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_value(obj: dict, key: str) -> tuple[str, str] | str:
    """The key's text, or (reason, detail) when it cannot be one."""
    if key not in obj:
        shown = ", ".join(list(obj)[:8])
        return "missing_key", f"key {key!r} not in the object (keys: {shown or 'none'})"
    value = obj[key]
    if not isinstance(value, str):
        return "non_string_value", f"key {key!r} holds {type(value).__name__}, not a string"
    if _orjson is None and not value.isascii() and _SURROGATE.search(value):  # pragma: no cover
        return "malformed_json", f"key {key!r} holds a lone surrogate escape (not valid Unicode)"
    if not value or value.isspace():
        return "empty_document", f"key {key!r} is empty or whitespace only"
    return value


def _parse_jsonl(payload: bytes, first_line: int, keys: Sequence[str]) -> Records:
    texts, lines, skips = [], [], []
    for offset, line in enumerate(_decode_lines(payload, first_line)):
        lineno = first_line + offset
        if isinstance(line, UnicodeDecodeError):
            skips.append((lineno, "invalid_utf8", _utf8_detail(line)))
            continue
        if not line or line.isspace():
            skips.append((lineno, "blank_line", "empty line"))
            continue
        try:
            obj = _loads(line)
        except _JSONError as e:
            skips.append((lineno, "malformed_json", str(e)[:200]))
            continue
        if not isinstance(obj, dict):
            skips.append((lineno, "not_an_object", f"JSON {type(obj).__name__}, expected an object"))
            continue
        values = []
        for key in keys:
            v = _check_value(obj, key)
            if isinstance(v, tuple):
                skips.append((lineno, *v))
                break
            values.append(v)
        else:
            texts.append(tuple(values))
            lines.append(lineno)
    return Records(texts, lines, skips)


def _parse_text_lines(payload: bytes, first_line: int) -> Records:
    texts, lines, skips = [], [], []
    for offset, line in enumerate(_decode_lines(payload, first_line)):
        lineno = first_line + offset
        if isinstance(line, UnicodeDecodeError):
            skips.append((lineno, "invalid_utf8", _utf8_detail(line)))
            continue
        line = line.rstrip("\r")
        if not line or line.isspace():
            continue       # a separator between documents, not a bad record
        texts.append((line,))
        lines.append(lineno)
    return Records(texts, lines, skips)


def _parse_text_blocks(payload: bytes, first_line: int) -> Records:
    """Documents are runs of non-blank lines; a block with a bad-UTF-8 line is skipped whole."""
    texts, lines, skips = [], [], []
    block: list[str] = []
    start, bad = 0, None

    def flush() -> None:
        if bad is not None:
            skips.append((start, "invalid_utf8", _utf8_detail(bad)))
        elif block:
            texts.append(("\n".join(block),))
            lines.append(start)

    for offset, line in enumerate(_decode_lines(payload, first_line)):
        lineno = first_line + offset
        if isinstance(line, str):
            line = line.rstrip("\r")
            if not line or line.isspace():
                flush()
                block, bad = [], None
                continue
        if not block and bad is None:
            start = lineno
        if isinstance(line, UnicodeDecodeError):
            bad = bad or line
            block.append("")
        else:
            block.append(line)
    flush()
    return Records(texts, lines, skips)


def _parse_columns(payload: dict[str, list], first_row: int, keys: Sequence[str]) -> Records:
    texts, lines, skips = [], [], []
    columns = [payload[k] for k in keys]
    for offset, values in enumerate(zip(*columns)):
        row = first_row + offset
        for key, value in zip(keys, values):
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                skips.append((row, "non_string_value", f"column {key!r} holds {kind}, not a string"))
                break
            if not value or value.isspace():
                skips.append((row, "empty_document", f"column {key!r} is empty or whitespace only"))
                break
        else:
            texts.append(tuple(values))
            lines.append(row)
    return Records(texts, lines, skips)
