"""Input formats, main-process side: find the files (megapre.data.input_files) and stream them
as record-aligned raw batches with the line number of their first record (records.py turns a
batch into texts in a worker).

The main process only reads and cuts bytes (plus gzip/zstd decompression and the sha256 of each
file as it streams by); JSON parsing, UTF-8 decoding and validation happen in the workers, so a raw
batch is one `bytes` object and crosses the process boundary without per-document pickling.
"""
from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, Sequence

# Finding the inputs is shared with tokenizer training; re-exported for the pipeline and tests.
from megapre.data.input_files import InputFile, expand_inputs  # noqa: F401
from megapre.data.preprocess.errors import Skip


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
        import zstandard

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


def check_dependencies(files: Sequence[InputFile]) -> None:
    """Fail before any work when an input needs an optional package that is not installed."""
    needs = {"zstandard": any(f.compression == "zstd" for f in files),
             "pyarrow": any(f.format == "parquet" for f in files)}
    for package, needed in needs.items():
        if needed:
            try:
                __import__(package)
            except ImportError as e:
                kind = ".zst" if package == "zstandard" else "Parquet"
                raise ValueError(f"{kind} inputs need the {package} package: pip install {package}") from e


class FileReader:
    """Streams one input file as RawBatches; after exhaustion `sha256` holds the file's checksum
    (of the bytes on disk) and `nbytes` the (decompressed) bytes read. A file that cannot be read
    on (truncated gzip, corrupt zstd/Parquet, permission denied) ends with a "skip" batch naming
    the line where reading stopped: the records before it are kept, the run goes on."""

    def __init__(self, file: InputFile, file_id: int, batch_bytes: int, text_mode: str,
                 keys: Sequence[str]) -> None:
        self.file, self.file_id = file, file_id
        self.batch_bytes, self.text_mode, self.keys = batch_bytes, text_mode, list(keys)
        self.sha256: str | None = None
        self.nbytes = 0
        self._next_line = 1

    def __iter__(self) -> Iterator[RawBatch]:
        try:
            if self.file.format == "parquet":
                yield from self._parquet()
            else:
                yield from self._lines()
        except Exception as e:  # noqa: BLE001 - any read/decode failure of this file's bytes
            try:
                self.sha256 = sha256_file(self.file.path)
            except OSError:
                self.sha256 = None
            unit = "row" if self.file.format == "parquet" else "line"
            detail = (f"cannot read from {unit} {self._next_line} on ({type(e).__name__}: {e}); "
                      "the rest of the file is skipped")
            yield RawBatch(self.file_id, 0, "skip",
                           Skip(self.file.path, self._next_line, "unreadable_file", detail), 0)

    def _lines(self) -> Iterator[RawBatch]:
        kind = "jsonl" if self.file.format == "jsonl" else (
            "text-line" if self.text_mode == "line" else "text-block")
        boundary = _block_boundary if kind == "text-block" else _line_boundary
        with open(self.file.path, "rb") as raw:
            hashing = HashingReader(raw)
            stream = _decompressed(hashing, self.file.compression)
            for first_line, chunk in iter_raw_chunks(stream, self.batch_bytes, boundary):
                self.nbytes += len(chunk)
                self._next_line = first_line + chunk.count(b"\n")
                yield RawBatch(self.file_id, first_line, kind, chunk, len(chunk))
            self.sha256 = hashing.finish()

    def _parquet(self) -> Iterator[RawBatch]:
        import pyarrow.parquet as pq

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
        for record_batch in pf.iter_batches(batch_size=batch_rows, columns=self.keys):
            payload = {k: record_batch.column(k).to_pylist() for k in self.keys}
            nbytes = int(record_batch.nbytes)
            self.nbytes += nbytes
            first = self._next_line
            self._next_line += record_batch.num_rows
            yield RawBatch(self.file_id, first, "parquet", payload, nbytes)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
