"""Stream documents out of the corpus formats preprocessing reads (JSONL, plain text, Parquet;
gzip/zstd; files, globs, directories), for tokenizer training.

Memory stays bounded: one line (or one blank-line block, or one Parquet batch) at a time. A cap on
documents or bytes is spread evenly over the files so a sample of many shards sees every shard.
Bad records are skipped and counted with file:line, or stop the run with `on_error="fail"`.
"""
from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Iterator, Sequence

from megapre.data.input_files import INPUT_FORMATS, TEXT_MODES, InputFile  # noqa: F401 (re-exported)
from megapre.data.input_files import expand_inputs as find_inputs


class CorpusError(ValueError):
    """Unusable input: the message names the file (and line) and what to do."""


@dataclass
class CorpusOptions:
    inputs: Sequence[str]
    json_keys: Sequence[str] = ("text",)
    input_format: str = "auto"
    text_mode: str = "line"  # plain text: one document per line, or per blank-line-separated block
    max_documents: int | None = None
    sample_bytes: int | None = None
    on_error: str = "skip"  # "skip": count and go on; "fail": stop at the first bad record


@dataclass
class CorpusStats:
    files: list[str] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents handed out
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first few "file:line: reason"
    truncated: bool = False  # a cap stopped the reading before the end of the corpus

    def skip(self, where: str, reason: str, on_error: str) -> None:
        if on_error == "fail":
            raise CorpusError(f"{where}: {reason} (pass --on-error skip to skip such records)")
        self.skipped[reason.split(":")[0]] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {reason}")


def expand_inputs(patterns: Sequence[str], input_format: str = "auto") -> list[InputFile]:
    """Files named by --input (paths, globs, directories): the files preprocessing would read, so
    its side outputs (PREFIX.stats.json, PREFIX.errors.jsonl) are never taken for corpus text."""
    try:
        return find_inputs(patterns, input_format)
    except ValueError as e:
        raise CorpusError(str(e)) from e


def _open(path: str) -> IO[bytes]:
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raise CorpusError(f"{path}: reading .zst needs the `zstandard` package: pip install zstandard") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _utf8(raw: bytes, where: str, stats: CorpusStats, on_error: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.skip(where, f"invalid UTF-8: byte {e.start} of the record", on_error)
        return None


def _encodable(text: str, where: str, stats: CorpusStats, on_error: str) -> bool:
    """JSON may escape lone surrogates (\\ud800), which are not text in any encoding."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError as e:
        stats.skip(where, f"invalid UTF-8: lone surrogate U+{ord(text[e.start]):04X} at character {e.start}", on_error)
        return False


def _jsonl_docs(path: str, opts: CorpusOptions, stats: CorpusStats) -> Iterator[str]:
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            line = _utf8(raw, where, stats, opts.on_error)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                stats.skip(where, f"malformed JSON: {e.msg} at column {e.colno}", opts.on_error)
                continue
            if not isinstance(obj, dict):
                stats.skip(where, f"not a JSON object: got {type(obj).__name__}", opts.on_error)
                continue
            for key in opts.json_keys:
                value = obj.get(key)
                if value is None:
                    stats.skip(where, f"missing key: {key!r} (see --json-keys)", opts.on_error)
                elif not isinstance(value, str):
                    stats.skip(where, f"non-string value: key {key!r} holds {type(value).__name__}", opts.on_error)
                elif _encodable(value, where, stats, opts.on_error):
                    yield value


def _text_docs(path: str, opts: CorpusOptions, stats: CorpusStats) -> Iterator[str]:
    """Lines keep their newline (a character-level vocabulary must contain it)."""
    block: list[str] = []
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, f"{path}:{lineno}", stats, opts.on_error)
            if line is None:
                continue
            if not line.strip():  # blank lines separate documents; they are not empty documents
                if block:
                    yield "".join(block)
                    block = []
            elif opts.text_mode == "line":
                yield line
            else:
                block.append(line)
    if block:
        yield "".join(block)


def _parquet_docs(path: str, opts: CorpusOptions, stats: CorpusStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading Parquet needs `pyarrow`: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own exception types for foreign files
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from e
    missing = [k for k in opts.json_keys if k not in pf.schema_arrow.names]
    if missing:
        raise CorpusError(f"{path}: no column {missing} (columns: {pf.schema_arrow.names}); see --json-keys")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=list(opts.json_keys)):
        columns = [batch.column(k).to_pylist() for k in opts.json_keys]
        for values in zip(*columns):
            row += 1
            for key, value in zip(opts.json_keys, values):
                if isinstance(value, str):
                    yield value
                else:
                    stats.skip(f"{path}:row {row}", f"non-string value: column {key!r} holds {type(value).__name__}",
                               opts.on_error)


READERS = {"jsonl": _jsonl_docs, "text": _text_docs, "parquet": _parquet_docs}


def iter_documents(opts: CorpusOptions, stats: CorpusStats) -> Iterator[str]:
    """Non-empty documents in input order, within the caps, counted into `stats`."""
    if opts.text_mode not in TEXT_MODES:
        raise CorpusError(f"--text-mode {opts.text_mode!r}: choose one of {', '.join(TEXT_MODES)}")
    files = expand_inputs(opts.inputs, opts.input_format)
    stats.files = [f.path for f in files]
    for index, file in enumerate(files):
        left = len(files) - index
        doc_cap = None if opts.max_documents is None else stats.documents + (opts.max_documents - stats.documents) // left
        byte_cap = None if opts.sample_bytes is None else stats.bytes + (opts.sample_bytes - stats.bytes) // left
        for doc in READERS[file.format](file.path, opts, stats):
            if not doc.strip():
                stats.skipped["empty document"] += 1
                continue
            if (doc_cap is not None and stats.documents >= doc_cap) or (byte_cap is not None and stats.bytes >= byte_cap):
                stats.truncated = True
                break
            stats.documents += 1
            stats.bytes += len(doc.encode("utf-8"))
            yield doc
