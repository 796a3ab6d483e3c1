"""Input formats: find the files, stream them in record-aligned raw batches (main process), and turn
a batch into per-record texts with file:line provenance (worker process).

The main process only reads and cuts bytes (plus gzip/zstd decompression and the sha256 of each
file as it streams by); JSON parsing, UTF-8 decoding and validation happen in the workers, so a raw
batch is one `bytes` object and crosses the process boundary without per-document pickling.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, Sequence

from megapre.data.preprocess.errors import Skip

try:  # orjson is ~3x faster than json on JSONL records; json is the always-available fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    _orjson = None

FORMATS = ("jsonl", "text", "parquet")
TEXT_MODES = ("line", "blank-line")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text")
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_OWN_OUTPUTS = (".stats.json", ".errors.jsonl")   # run artifacts: not corpus in a dir/glob match


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str          # one of FORMATS
    compression: str     # "none" | "gzip" | "zstd"
    size: int            # bytes on disk


@dataclass
class RawBatch:
    """Records of one file, cut at record boundaries. `first_line` is the 1-based line (Parquet:
    row) of the first record; `payload` is raw bytes (jsonl/text), column -> values (parquet), or
    the file-level Skip (kind "skip")."""

    file_id: int
    first_line: int
    kind: str            # "jsonl" | "text-line" | "text-block" | "parquet" | "skip"
    payload: Any
    nbytes: int


# ----------------------------------------------------------------------------- finding inputs

def detect_format(path: str, input_format: str = "auto") -> tuple[str, str] | None:
    """(format, compression) of `path`; None when `auto` cannot tell from the name."""
    name = path.lower()
    compression = "none"
    for suffix, kind in _COMPRESSION.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
            break
    if input_format != "auto":
        if input_format == "parquet" and compression != "none":
            raise ValueError(f"{path}: Parquet files are compressed internally; a {compression} "
                             "wrapper is not supported, decompress the file first")
        return input_format, compression
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(_TEXT_SUFFIXES):
        return "text", compression
    if name.endswith(".parquet") and compression == "none":
        return "parquet", compression
    return None


def expand_inputs(patterns: Sequence[str], input_format: str = "auto") -> list[InputFile]:
    """Resolve --input values (files, globs, directories searched recursively) to a deduplicated,
    deterministic file list: patterns in the order given, matches of each in sorted order."""
    if input_format not in ("auto", *FORMATS):
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
                    f"{', '.join(_JSONL_SUFFIXES + _TEXT_SUFFIXES)}, .parquet, optionally + .gz/.zst);"
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
                if (not name.startswith(".") and not name.endswith(_OWN_OUTPUTS)
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
                       if os.path.isfile(p) and not p.endswith(_OWN_OUTPUTS))
        if not found:
            raise ValueError(f"--input {pattern}: the pattern matches no files")
        return found
    raise ValueError(f"--input {pattern}: no such file or directory")


# ----------------------------------------------------------------------------- raw streaming

class HashingReader:
    """File-like wrapper that feeds every byte read through sha256, so the checksum of a
    (compressed) input costs no second pass over the file."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        return data

    def readinto(self, buf) -> int:  # gzip's fast path
        n = self.raw.readinto(buf)
        self.sha256.update(memoryview(buf)[:n])
        return n

    def readable(self) -> bool:
        return True

    def finish(self) -> str:
        """Hash whatever the decompressor did not consume (trailing bytes) and return the digest."""
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


def _decompressed(hashing: HashingReader, compression: str) -> IO[bytes]:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=hashing, mode="rb")  # type: ignore[arg-type]
    if compression == "zstd":
        try:
            import zstandard
        except ImportError as e:
            raise RuntimeError("reading .zst inputs needs the zstandard package: "
                               "pip install zstandard") from e
        return zstandard.ZstdDecompressor().stream_reader(hashing, read_across_frames=True)
    return hashing  # type: ignore[return-value]


def _line_boundary(buf: bytearray, start: int) -> int:
    """End of the last complete line in buf[start:], or -1."""
    pos = buf.rfind(b"\n", start)
    return pos + 1 if pos >= 0 else -1


_BLANK = re.compile(rb"[ \t\r\f\v]*")


def _block_boundary(buf: bytearray, start: int) -> int:
    """End of the last blank (whitespace-only) line whose newline lies in buf[start:], or -1:
    a cut there never splits a blank-line-separated block. `buf` starts at a line start."""
    end = buf.rfind(b"\n")
    while end >= start:
        prev = buf.rfind(b"\n", 0, end)          # -1: the line starts at buf[0]
        if _BLANK.fullmatch(buf, prev + 1, end):
            return end + 1
        end = prev
    return -1


def iter_raw_chunks(stream: IO[bytes], batch_bytes: int,
                    boundary: Callable[[bytearray, int], int]) -> Iterator[tuple[int, bytes]]:
    """Yield (first_line, chunk) with chunks of about batch_bytes cut at `boundary`; a record
    longer than batch_bytes makes its chunk longer (memory is bounded by the largest record)."""
    buf = bytearray()
    line = 1
    searched = 0
    while True:
        data = stream.read(batch_bytes)
        if not data:
            break
        buf += data
        if len(buf) < batch_bytes:
            continue
        cut = boundary(buf, searched)
        if cut < 0:
            searched = max(0, len(buf) - 1)
            continue
        chunk = bytes(buf[:cut])
        del buf[:cut]
        searched = 0
        yield line, chunk
        line += chunk.count(b"\n")
    if buf:
        yield line, bytes(buf)


class FileReader:
    """Streams one input file as RawBatches; after exhaustion `sha256` holds the file's checksum
    (of the bytes on disk) and `nbytes` the (decompressed) bytes read."""

    def __init__(self, file: InputFile, file_id: int, batch_bytes: int, text_mode: str,
                 keys: Sequence[str]) -> None:
        self.file, self.file_id = file, file_id
        self.batch_bytes, self.text_mode, self.keys = batch_bytes, text_mode, list(keys)
        self.sha256: str | None = None
        self.nbytes = 0

    def __iter__(self) -> Iterator[RawBatch]:
        if self.file.format == "parquet":
            yield from self._parquet()
            return
        kind = "jsonl" if self.file.format == "jsonl" else (
            "text-line" if self.text_mode == "line" else "text-block")
        boundary = _block_boundary if kind == "text-block" else _line_boundary
        with open(self.file.path, "rb") as raw:
            hashing = HashingReader(raw)
            stream = _decompressed(hashing, self.file.compression)
            try:
                for first_line, chunk in iter_raw_chunks(stream, self.batch_bytes, boundary):
                    self.nbytes += len(chunk)
                    yield RawBatch(self.file_id, first_line, kind, chunk, len(chunk))
            except (OSError, EOFError) as e:  # truncated/corrupt gzip or zstd stream
                raise RuntimeError(f"{self.file.path}: cannot read ({self.file.compression}): {e}") from e
            self.sha256 = hashing.finish()

    def _parquet(self) -> Iterator[RawBatch]:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RuntimeError("reading Parquet inputs needs pyarrow: pip install pyarrow") from e
        pf = pq.ParquetFile(self.file.path)
        names = pf.schema_arrow.names
        missing = [k for k in self.keys if k not in names]
        rows = pf.metadata.num_rows
        if missing:
            detail = (f"column(s) {', '.join(map(repr, missing))} not in the file (columns: "
                      f"{', '.join(names)}); every row skipped")
            yield RawBatch(self.file_id, 0, "skip", Skip(self.file.path, 0, "missing_key", detail,
                                                         max(rows, 1)), 0)
        else:
            yield from self._parquet_batches(pf, rows)
        self.sha256 = sha256_file(self.file.path)

    def _parquet_batches(self, pf: Any, rows: int) -> Iterator[RawBatch]:
        row_bytes = max(1, self.file.size // max(rows, 1))
        batch_rows = max(1, self.batch_bytes // row_bytes)
        first = 1
        for record_batch in pf.iter_batches(batch_size=batch_rows, columns=self.keys):
            payload = {k: record_batch.column(k).to_pylist() for k in self.keys}
            nbytes = int(record_batch.nbytes)
            self.nbytes += nbytes
            yield RawBatch(self.file_id, first, "parquet", payload, nbytes)
            first += record_batch.num_rows


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- worker-side parsing

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


def _decode_lines(payload: bytes) -> list[str | UnicodeDecodeError]:
    """Lines of the chunk (without the newline; a final newline ends the last line, it does not
    start an empty one). One decode for the whole chunk; per line only when it has bad UTF-8."""
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
    for offset, line in enumerate(_decode_lines(payload)):
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
    for offset, line in enumerate(_decode_lines(payload)):
        lineno = first_line + offset
        if isinstance(line, UnicodeDecodeError):
            skips.append((lineno, "invalid_utf8", _utf8_detail(line)))
            continue
        line = line.rstrip("\r")
        if not line or line.isspace():
            skips.append((lineno, "empty_document", "empty line (--text-mode line: one document per line)"))
            continue
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

    for offset, line in enumerate(_decode_lines(payload)):
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
