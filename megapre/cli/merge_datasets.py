"""`python tools/merge_datasets.py` (console `megapre-merge-datasets`): join indexed datasets
(e.g. the shards of a sharded preprocessing run) into one (megapre.data.indexed.merge_datasets).

    python tools/merge_datasets.py --input A B C --output-prefix ALL
    python tools/merge_datasets.py --input-dir shards/ --output-prefix ALL   # every *.idx, sorted

Documents keep their order (inputs in the order given) and their boundaries. Every input is opened and
validated before a byte is written, so a bad shard is reported by name up front; the output appears
only when complete. An input is never overwritten, and an existing output only with --overwrite.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from megapre.data.indexed import IndexedDataset, IndexedDatasetError, merge_datasets
from megapre.data.preprocess.stats import write_json_atomic
from megapre.data.stats_file import merged_stats, sidecar_path
from megapre.cli.common import prog_name

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("merge_datasets.py"),
        description="Concatenate Megatron/megapre indexed datasets (PREFIX.bin + PREFIX.idx) into one.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="PREFIX",
                     help="dataset prefixes to merge, in order (a single directory works like --input-dir, "
                          "as in Megatron's merge_datasets.py)")
    src.add_argument("--input-dir", metavar="DIR", help="merge every DIR/*.idx dataset, in sorted name order")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="merge even when the inputs' stats files record different tokenizers")
    return p


def prefixes_in_dir(directory: str) -> list[str]:
    """The dataset prefixes of ``directory/*.idx`` in sorted order; each must have its .bin."""
    d = Path(directory)
    if not d.is_dir():
        raise IndexedDatasetError(f"--input-dir {directory}: not a directory")
    prefixes = [str(p.with_suffix("")) for p in sorted(d.glob("*.idx"))]
    if not prefixes:
        raise IndexedDatasetError(f"--input-dir {directory}: no *.idx files found; nothing to merge")
    for prefix in prefixes:
        if not os.path.isfile(prefix + ".bin"):
            raise IndexedDatasetError(f"{prefix}: has an .idx but no .bin in --input-dir {directory}")
    return prefixes


def _resolve_inputs(args: argparse.Namespace) -> list[str]:
    if args.input_dir is not None:
        return prefixes_in_dir(args.input_dir)
    only = args.input[0]
    if len(args.input) == 1 and os.path.isdir(only) and not IndexedDataset.exists(only):
        return prefixes_in_dir(only)
    return list(args.input)


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_output(inputs: Sequence[str], output_prefix: str, overwrite: bool) -> None:
    """Refuse an output that is one of the inputs (by path or by file identity) or, without
    ``overwrite``, one that already exists."""
    out = os.path.realpath(output_prefix)
    for prefix in inputs:
        clash = os.path.realpath(prefix) == out or any(
            _same_file(prefix + ext, output_prefix + ext) for ext in (".bin", ".idx")
        )
        if clash:
            raise IndexedDatasetError(
                f"{prefix}: is an input and also the --output-prefix; write the merge to another prefix"
            )
    if output_prefix.endswith((".bin", ".idx")):
        raise IndexedDatasetError(
            f"--output-prefix {output_prefix}: give the prefix without the extension "
            f"({output_prefix[:-4]}), the tool writes both .bin and .idx"
        )
    existing = [output_prefix + ext for ext in (".bin", ".idx") if os.path.exists(output_prefix + ext)]
    if existing and not overwrite:
        raise IndexedDatasetError(
            f"--output-prefix {output_prefix}: {', '.join(existing)} already exists; pass --overwrite to replace it"
        )


def _tokenizer_record(inputs: list[str], allow_mismatch: bool) -> dict:
    """The output's stats file (PREFIX.stats.json): the inputs' tokenizer when they agree, so
    training checks merged data too; inputs made with different tokenizers are refused."""
    record, conflicts = merged_stats(inputs)
    if conflicts and not allow_mismatch:
        raise IndexedDatasetError(
            f"inputs were made with different tokenizers: {inputs[0]} and {', '.join(conflicts)}; "
            "pass --allow-tokenizer-mismatch to merge them anyway")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        inputs = _resolve_inputs(args)
        check_output(inputs, args.output_prefix, args.overwrite)

        def progress(k: int, ds: IndexedDataset) -> None:
            print(f"[{k + 1}/{len(inputs)}] {ds.path_prefix}: {ds.num_documents} documents, "
                  f"{len(ds)} sequences, {ds.num_tokens} tokens", flush=True)

        record = _tokenizer_record(inputs, args.allow_tokenizer_mismatch)
        merge_datasets(inputs, args.output_prefix, progress=progress)
        merged = IndexedDataset(args.output_prefix)
        write_json_atomic(sidecar_path(args.output_prefix), record)
    except (IndexedDatasetError, ValueError, OSError) as e:
        print(f"merge_datasets: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    seconds = time.perf_counter() - start
    size = os.path.getsize(args.output_prefix + ".bin")
    print(f"merged {len(inputs)} datasets into {args.output_prefix}.bin/.idx: {merged.num_documents} documents, "
          f"{len(merged)} sequences, {merged.num_tokens} tokens ({merged.dtype.name}), "
          f"{size / 2**20:.1f} MiB in {seconds:.1f} s")
    return EXIT_OK
