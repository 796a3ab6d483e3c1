"""The preprocessing run: files -> raw batches (main) -> encode (worker processes) -> results in
input order (main) -> indexed-dataset builders; then the errors file and, last, the stats file.

Ordering: batches are submitted in input order and consumed first-in-first-out, so the output is
identical whatever the number of workers. Memory: at most `max_inflight` batches are submitted
ahead of the writer, so the process tree holds a bounded number of ~batch_bytes batches whatever
the corpus size.
"""
from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from contextlib import closing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from megapre.data.preprocess import shards as sh
from megapre.data.preprocess.chunking import MAX_CHARS
from megapre.data.preprocess.input_check import changed_inputs, signature
from megapre.data.preprocess.leftovers import remove_stale_temporaries
from megapre.data.preprocess.encode import (EncodeConfig, EncodedBatch, Encoder, encode_in_worker,
                                            init_worker)
from megapre.data.preprocess.errors import EXIT_OK, EXIT_SKIPPED, ErrorLog, Skip
from megapre.data.preprocess.readers import (FileReader, InputFile, RawBatch, check_dependencies,
                                             expand_inputs)
from megapre.data.preprocess.stats import Counters, Progress, peak_rss_mb, write_json_atomic
from megapre.run_lock import RunLock


@dataclass
class PreprocessConfig:
    """Everything a run depends on (the CLI flags)."""

    inputs: list[str]
    output_prefix: str
    tokenizer: Any                                  # megapre.data.tokenizers.TokenizerConfig
    json_keys: tuple[str, ...] = ("text",)
    input_format: str = "auto"
    text_mode: str = "line"
    append_eod: bool = False
    split_sentences: bool = False
    keep_newlines: bool = False
    workers: int = 1
    batch_bytes: int = 1 << 18
    on_error: str = "skip"                          # "skip" | "fail"
    shard_index: int | None = None
    num_shards: int | None = None
    overwrite: bool = False
    progress_interval: float = 5.0
    chunk_chars: int = MAX_CHARS                    # longer documents are tokenized in pieces
    verify_inputs: bool = False                     # reuse a finished run only on equal sha256


class UsageError(ValueError):
    """A problem with the flags or inputs, found before any output was written (exit code 2)."""


@dataclass
class RunReport:
    exit_code: int
    stats: dict[str, Any]
    skipped_run: bool = False                       # a finished shard found and left alone
    messages: list[str] = field(default_factory=list)


def _log(msg: str) -> None:
    print(f"[preprocess] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- ordered parallel map

def ordered_map(items: Iterable[RawBatch], workers: int, max_inflight: int,
                initargs: tuple) -> Iterator[EncodedBatch]:
    """Encode items in `workers` processes (0: in this process), yielding results in input
    order with at most `max_inflight` items submitted and not yet yielded."""
    if workers == 0:
        encoder = Encoder(*initargs)
        yield from map(encoder, items)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                               initargs=initargs)
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(encode_in_worker, item))
            while len(pending) >= max_inflight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- writing

class DatasetWriter:
    """One indexed-dataset builder per JSON key; documents go in as the encoded batches say."""

    def __init__(self, prefixes: dict[str, str], dtype: np.dtype, builder_cls: Any) -> None:
        self.keys = list(prefixes)
        self.builders = {}
        try:
            for key, prefix in prefixes.items():
                self.builders[key] = builder_cls(prefix, dtype=dtype)
        except BaseException:
            self.abort()
            raise

    def write(self, batch: EncodedBatch, counters: Counters) -> None:
        for k, key in enumerate(self.keys):
            tokens, lengths, doc_seqs = batch.tokens[k], batch.seq_lengths[k], batch.doc_seqs[k]
            builder = self.builders[key]
            ends = np.cumsum(lengths, dtype=np.int64).tolist()
            if doc_seqs is None:                      # one sequence per document
                start = 0
                for end in ends:
                    builder.add_document(tokens[start:end])
                    start = end
            else:
                seq, start = 0, 0
                lens = lengths.tolist()
                for n in doc_seqs.tolist():
                    end = ends[seq + n - 1]
                    builder.add_document(tokens[start:end], lens[seq:seq + n])
                    seq, start = seq + n, end
            counters.add(key, int(tokens.size), int(lengths.size))
        counters.documents += batch.num_docs
        counters.bytes += batch.nbytes

    def finalize(self) -> None:
        for builder in self.builders.values():
            builder.finalize()

    def abort(self) -> None:
        for builder in self.builders.values():
            builder.abort()


# ----------------------------------------------------------------------------- the run

def _setup_error(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise UsageError(str(e)) from e


def _default_factory(config: Any) -> Any:
    from megapre.data.tokenizers import build_tokenizer

    return build_tokenizer(config)


def _config_dict(cfg: PreprocessConfig) -> dict[str, Any]:
    d = asdict(cfg)
    if is_dataclass(cfg.tokenizer):
        d["tokenizer"] = asdict(cfg.tokenizer)
    return d


@dataclass
class _Plan:
    """What a run will do, decided before anything is written."""

    files: list[InputFile]          # all inputs
    mine: list[InputFile]           # this shard's
    spec: sh.ShardSpec
    tokenizer: Any
    dtype: np.dtype
    prefix: str                     # PREFIX or PREFIX_shardIIIII-of-NNNNN
    outputs: dict[str, str]         # key -> dataset prefix
    fingerprint: dict[str, Any]
    signatures: list[dict[str, Any]]  # size, mtime, head/tail hash of each of `mine`, before reading


def run_preprocess(cfg: PreprocessConfig, tokenizer_factory: Callable[[Any], Any] | None = None,
                   builder_cls: Any = None, dataset_cls: Any = None) -> RunReport:
    """Run (or resume) one shard of a preprocessing job. Raises UsageError for bad flags/inputs,
    errors.InputError under --on-error fail, anything else for I/O failures; in every failing
    case no output (and no stats file) of this run is published."""
    from megapre.data.indexed import IndexedDataset, IndexedDatasetBuilder

    t0 = time.perf_counter()
    plan = _plan(cfg, tokenizer_factory or _default_factory)
    _setup_error(lambda: os.makedirs(os.path.dirname(os.path.abspath(plan.prefix)), exist_ok=True))
    with _prefix_lock(plan.prefix):
        return _run_locked(cfg, plan, t0, builder_cls or IndexedDatasetBuilder,
                           dataset_cls or IndexedDataset)


def prefix_lock(prefix: str) -> RunLock:
    """The (not yet acquired) lock of one output prefix, `PREFIX.lock`."""
    return RunLock(f"{prefix}.lock", "--output-prefix", prefix,
                   "two preprocessing runs writing one prefix lose one run's output")


@contextlib.contextmanager
def _prefix_lock(prefix: str) -> Iterator[None]:
    """Hold PREFIX.lock for the run; another live run's lock is a UsageError naming it."""
    lock = prefix_lock(prefix)
    for note in _setup_error(lock.acquire):
        _log(note)
    try:
        yield
    finally:
        lock.release()


def _run_locked(cfg: PreprocessConfig, plan: _Plan, t0: float, builder_cls: Any,
                dataset_cls: Any) -> RunReport:
    """The run, holding the prefix lock: reuse a finished run or redo it."""
    remove_stale_temporaries([plan.prefix, *plan.outputs.values()], _log)
    done = _finished(plan, cfg, dataset_cls)
    if done is not None:
        _log(f"{sh.stats_path(plan.prefix)}: this {'shard' if plan.spec.sharded else 'run'} already "
             "finished with the same inputs and settings; skipping (pass --overwrite to redo it)")
        report = RunReport(int(done.get("exit_code", EXIT_OK)), done, skipped_run=True)
        _announce_merge(cfg, plan.spec, report)
        return report
    sh.stats_path(plan.prefix).unlink(missing_ok=True)   # from here on the old run is not "finished"
    try:
        counters, errors, readers = _execute(cfg, plan, builder_cls)
        exit_code = EXIT_SKIPPED if errors.total else EXIT_OK
        stats = _stats(cfg, plan, readers, counters, errors, exit_code, time.perf_counter() - t0)
        write_json_atomic(sh.stats_path(plan.prefix), stats)   # last: marks the run finished
    except OSError as e:
        raise _disk_full(e, plan) if e.errno == errno.ENOSPC else e
    report = RunReport(exit_code, stats)
    _summary(report, errors, plan.prefix)
    _announce_merge(cfg, plan.spec, report)
    return report


class DiskFullError(OSError):
    """ENOSPC while writing outputs; the message names the directory (temporaries are removed)."""


def _disk_full(e: OSError, plan: _Plan) -> DiskFullError:
    where = e.filename or os.path.dirname(os.path.abspath(plan.prefix))
    return DiskFullError(errno.ENOSPC, f"{where}: no space left on device while writing the outputs "
                         f"of {plan.prefix}; the partial outputs were removed and the run is not "
                         "marked finished. Free space or choose another --output-prefix")


def _plan(cfg: PreprocessConfig, factory: Callable[[Any], Any]) -> _Plan:
    from megapre.data.indexed import optimal_dtype

    _validate(cfg)
    files = _setup_error(lambda: expand_inputs(cfg.inputs, cfg.input_format))
    _setup_error(lambda: check_dependencies(files))
    if any(f.format == "text" for f in files) and len(cfg.json_keys) != 1:
        raise UsageError(f"--json-keys {' '.join(cfg.json_keys)}: plain-text inputs hold one "
                         "field per document; give a single key (it only names the output)")
    spec = _setup_error(lambda: sh.resolve_shard(cfg.shard_index, cfg.num_shards))
    mine = sh.assign_files(files, spec)
    if cfg.workers >= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"   # threads stay in the workers' lane
    tokenizer = _setup_error(lambda: factory(cfg.tokenizer))
    if cfg.append_eod and tokenizer.eod is None:
        raise UsageError(f"--append-eod: tokenizer {tokenizer.name} has no end-of-document token")
    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size))
    prefix = sh.run_prefix(cfg.output_prefix, spec)
    outputs = {k: sh.dataset_prefix(prefix, k, cfg.split_sentences) for k in cfg.json_keys}
    signatures = [signature(f.path) for f in mine]
    return _Plan(files, mine, spec, tokenizer, dtype, prefix, outputs,
                 _fingerprint(cfg, mine, tokenizer, dtype, spec), signatures)


def _execute(cfg: PreprocessConfig, plan: _Plan,
             builder_cls: Any) -> tuple[Counters, ErrorLog, list[FileReader]]:
    """Stream this shard's files through the workers into the builders; publish the datasets and
    the errors file, or on any failure remove everything this run wrote."""
    _log(f"{'shard ' + str(plan.spec.index) + '/' + str(plan.spec.count) + ': ' if plan.spec.sharded else ''}"
         f"{len(plan.mine)} of {len(plan.files)} input file(s), "
         f"{sum(f.size for f in plan.mine) / 1e6:,.1f} MB, tokenizer {plan.tokenizer.name} "
         f"(vocab {plan.tokenizer.vocab_size}, {plan.dtype}), {cfg.workers} worker(s)")
    errors = ErrorLog(sh.errors_path(plan.prefix), fail_fast=cfg.on_error == "fail")
    writer = DatasetWriter(plan.outputs, plan.dtype, builder_cls)
    counters = Counters()
    plain = all(f.compression == "none" and f.format != "parquet" for f in plan.mine)
    progress = Progress(counters, cfg.progress_interval,
                        total_bytes=sum(f.size for f in plan.mine) if plain else None)
    readers: list[FileReader] = []
    enc_cfg = EncodeConfig(tuple(cfg.json_keys), cfg.append_eod, cfg.split_sentences,
                           cfg.keep_newlines, plan.dtype.name, cfg.chunk_chars)
    try:
        batches = _batches(plan.mine, cfg, readers)
        inflight = 2 * cfg.workers + 2
        with closing(ordered_map(batches, cfg.workers, inflight, (plan.tokenizer, enc_cfg))) as results:
            for enc in results:
                _record_skips(errors, enc, plan.mine)
                writer.write(enc, counters)
                progress.update(errors.total)
        writer.finalize()
        errors.close()
    except BaseException:
        writer.abort()
        errors.abort()
        raise
    finally:
        progress.close()
    return counters, errors, readers


def _validate(cfg: PreprocessConfig) -> None:
    if cfg.workers < 0:
        raise UsageError(f"--workers {cfg.workers}: must be >= 0 (0 = tokenize in this process)")
    if cfg.batch_bytes < 1:
        raise UsageError(f"--batch-bytes {cfg.batch_bytes}: must be >= 1")
    if not cfg.json_keys or len(set(cfg.json_keys)) != len(cfg.json_keys):
        raise UsageError(f"--json-keys {' '.join(cfg.json_keys)}: give one or more distinct keys")
    if cfg.on_error not in ("skip", "fail"):
        raise UsageError(f"--on-error {cfg.on_error}: choose skip or fail")
    if cfg.text_mode not in ("line", "blank-line"):
        raise UsageError(f"--text-mode {cfg.text_mode}: choose line or blank-line")
    if cfg.output_prefix.endswith(("/", os.sep)) or os.path.isdir(cfg.output_prefix):
        raise UsageError(f"--output-prefix {cfg.output_prefix}: is a directory; give a file-name "
                         f"prefix such as {os.path.join(cfg.output_prefix, 'corpus')} (outputs are "
                         "PREFIX_text_document.bin/.idx)")
    if cfg.keep_newlines and not cfg.split_sentences:
        _log("warning: --keep-newlines has no effect without --split-sentences")


def _batches(files: Sequence[InputFile], cfg: PreprocessConfig,
             readers: list[FileReader]) -> Iterator[RawBatch]:
    for file_id, f in enumerate(files):
        reader = FileReader(f, file_id, cfg.batch_bytes, cfg.text_mode, cfg.json_keys)
        readers.append(reader)
        yield from reader


def _record_skips(errors: ErrorLog, enc: EncodedBatch, files: Sequence[InputFile]) -> None:
    if enc.file_skip is not None:
        errors.add([enc.file_skip])
    if enc.skips:
        path = files[enc.file_id].path
        errors.add(Skip(path, line, reason, detail) for line, reason, detail in enc.skips)


def _fingerprint(cfg: PreprocessConfig, files: Sequence[InputFile], tokenizer: Any,
                 dtype: np.dtype, spec: sh.ShardSpec) -> dict[str, Any]:
    """What makes two runs produce the same output; a finished run is reused only on a match."""
    return {
        "inputs": [f.path for f in files],           # contents: see input_check.py
        "tokenizer": tokenizer.describe(),
        "json_keys": list(cfg.json_keys),
        "input_format": cfg.input_format,
        "text_mode": cfg.text_mode,
        "append_eod": cfg.append_eod,
        "split_sentences": cfg.split_sentences,
        "keep_newlines": cfg.keep_newlines,
        "dtype": dtype.name,
        "shard": [spec.index, spec.count],
    }


def _finished(plan: _Plan, cfg: PreprocessConfig, dataset_cls: Any) -> dict[str, Any] | None:
    """The stats of a finished run with the same fingerprint and unchanged inputs (None: run it,
    saying why). A finished run with other settings is a usage error unless --overwrite."""
    old = sh.load_stats(plan.prefix)
    if old is None or cfg.overwrite:
        return None
    if not all(dataset_cls.exists(p) for p in plan.outputs.values()):
        _log(f"{sh.stats_path(plan.prefix)} says finished but outputs are missing; redoing the run")
        return None
    fingerprint = json.loads(json.dumps(plan.fingerprint))  # compare as stored (lists, not tuples)
    diff = sh.fingerprint_diff(_paths_only(old.get("fingerprint", {})), fingerprint)
    if diff:
        raise UsageError(
            f"{sh.stats_path(plan.prefix)}: outputs at this prefix were made with different "
            f"{', '.join(diff)}; pass --overwrite to replace them or choose another --output-prefix")
    changed = changed_inputs([f.path for f in plan.mine], old.get("inputs", []), cfg.verify_inputs)
    if changed:
        _log(f"input(s) changed since the finished run, redoing it: {'; '.join(changed[:3])}"
             f"{f' (+{len(changed) - 3} more)' if len(changed) > 3 else ''}")
        return None
    return old


def _paths_only(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Older stats recorded inputs as [path, size]; sizes are now checked with the contents."""
    inputs = fingerprint.get("inputs")
    if isinstance(inputs, list):
        fingerprint = {**fingerprint, "inputs": [x[0] if isinstance(x, list) and x else x
                                                 for x in inputs]}
    return fingerprint


def _stats(cfg: PreprocessConfig, plan: _Plan, readers: Sequence[FileReader], counters: Counters,
           errors: ErrorLog, exit_code: int, elapsed: float) -> dict[str, Any]:
    inputs = [{"path": f.path, "format": f.format, "compression": f.compression, **sig,
               "bytes_read": r.nbytes, "sha256": r.sha256}
              for f, r, sig in zip(plan.mine, readers, plan.signatures)]
    return {
        "complete": True,
        "exit_code": exit_code,
        "documents": counters.documents,
        "sequences": dict(counters.sequences),
        "tokens": dict(counters.tokens),
        "bytes": counters.bytes,
        "skipped": errors.by_reason(),
        "skipped_total": errors.total,
        "errors_file": str(errors.path) if errors.total else None,
        "outputs": {k: {"prefix": p, "dtype": plan.dtype.name} for k, p in plan.outputs.items()},
        "shard": {"index": plan.spec.index, "count": plan.spec.count},
        "tokenizer": plan.tokenizer.describe(),
        "inputs": inputs,
        "args": _config_dict(cfg),
        "elapsed_s": round(elapsed, 3),               # from the start of the run (after imports)
        "loop_s": round(counters.elapsed(), 3),       # streaming only (tokenizer already built)
        "tokens_per_s": round(counters.total_tokens / max(counters.elapsed(), 1e-9), 1),
        "peak_rss_mb": peak_rss_mb(),
        "fingerprint": plan.fingerprint,
    }


def _summary(report: RunReport, errors: ErrorLog, prefix: str) -> None:
    s = report.stats
    tokens = sum(s["tokens"].values())
    _log(f"done in {s['elapsed_s']:.1f}s: {s['documents']:,} documents, {s['bytes'] / 1e6:,.1f} MB, "
         f"{tokens:,} tokens ({s['tokens_per_s']:,.0f} tokens/s); peak RSS main "
         f"{s['peak_rss_mb']['main']:.0f} MB, largest worker {s['peak_rss_mb']['largest_worker']:.0f} MB")
    for key, out in s["outputs"].items():
        _log(f"wrote {out['prefix']}.bin/.idx ({out['dtype']}, {s['sequences'].get(key, 0):,} sequences)")
    if errors.total:
        reasons = ", ".join(f"{r} {n:,}" for r, n in s["skipped"].items())
        _log(f"skipped {errors.total:,} record(s): {reasons}; each is listed in {errors.path}")
        for skip in errors.first:
            _log(f"  {skip.message()}")
    _log(f"stats: {sh.stats_path(prefix)}")


def _announce_merge(cfg: PreprocessConfig, spec: sh.ShardSpec, report: RunReport) -> None:
    if not spec.sharded:
        return
    done = sh.finished_shards(cfg.output_prefix, spec.count)
    lines = sh.merge_command(cfg.output_prefix, cfg.json_keys, cfg.split_sentences, spec.count)
    head = (f"all {spec.count} shards finished; join them with:" if len(done) == spec.count else
            f"{len(done)}/{spec.count} shards finished; when all are, join them with:")
    report.messages = [head, *lines]
    for line in report.messages:
        _log(line)
