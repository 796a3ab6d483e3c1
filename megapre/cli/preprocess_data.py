"""Command line of tools/preprocess_data.py (console `megapre-preprocess-data`, `python -m
megapre.data.preprocess`): Megatron's flags plus input formats, error policy, sharding and resume. `main(argv)` returns the exit code instead of exiting, so it can be called
from Python and tested in-process."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Sequence

from megapre.data.preprocess.errors import (EXIT_FAILURE, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE,
                                            InputError)

from .tokenizer_flags import add_tokenizer_flags, tokenizer_config_from_args
from megapre.cli.common import prog_name

EPILOG = f"""\
outputs (as Megatron): PREFIX_{{key}}_document.bin/.idx per --json-keys key (_sentence with
--split-sentences); PREFIX.stats.json (written last: marks the run finished); PREFIX.errors.jsonl
(one line per skipped record: file, line, reason) when anything was skipped. With --num-shards N
(or under torchrun: WORLD_SIZE), PREFIX becomes PREFIX_shardIIIII-of-NNNNN and input files are
split across shards; tools/merge_datasets.py joins them. A rerun skips a finished run/shard whose
settings and input contents are unchanged (see --verify-inputs) and redoes it, saying why, when an
input changed. One run per prefix at a time: PREFIX.lock names the owner (host, pid).

exit codes:
  {EXIT_OK}  every record became a document
  {EXIT_SKIPPED}  finished, but records were skipped (malformed JSON, missing key, non-string value,
     invalid UTF-8, empty document, blank line, tokenizer error, unreadable rest of a
     truncated/corrupt file); see PREFIX.errors.jsonl
  {EXIT_FAILURE}  failed (I/O error, or the first bad record under --on-error fail); nothing published
  {EXIT_USAGE}  bad flags or inputs (nothing was written)

example:
  python tools/preprocess_data.py --input corpus/ --output-prefix data/gpt2 --json-keys text \\
      --tokenizer-type GPT2BPETokenizer --vocab-file gpt2/vocab.json --merge-file gpt2/merges.txt \\
      --append-eod --workers 8
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("preprocess_data.py"), epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize a corpus into Megatron indexed datasets (.bin/.idx), streaming, "
                    "in bounded memory, in input order whatever the worker count.")
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="file(s), glob(s) or director(ies) (searched recursively, sorted): "
                        ".jsonl/.json/.ndjson, .txt, .parquet; jsonl/txt may be .gz or .zst")
    g.add_argument("--input-format", default="auto", choices=["auto", "jsonl", "text", "parquet"],
                   help="format of every input (default: from each file name)")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="JSON keys (Parquet: columns) to tokenize, one dataset each (default: text); "
                        "a record missing any of them is skipped for all")
    g.add_argument("--text-mode", default="line", choices=["line", "blank-line"],
                   help="plain-text inputs (.txt): 'line' (default) makes every line a document "
                        "and skips blank lines; 'blank-line' makes every paragraph (lines up to a "
                        "blank line) one document, the better choice for books and other "
                        "hard-wrapped prose")
    g.add_argument("--split-sentences", action="store_true",
                   help="split documents into sentences (offline rule-based splitter; for BERT)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="with --split-sentences, keep the newlines between sentences")
    g.add_argument("--lang", default="english",
                   help="sentence-splitter language (Megatron's flag; only english is supported)")
    t = add_tokenizer_flags(p)
    t.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document")
    o = p.add_argument_group("output and runtime")
    o.add_argument("--output-prefix", required=True, help="path prefix of the outputs")
    o.add_argument("--workers", type=int, default=1,
                   help="tokenizer worker processes (default 1; 0 = in this process)")
    o.add_argument("--batch-bytes", type=int, default=1 << 18,
                   help="input bytes per batch sent to a worker (default 256 KiB)")
    o.add_argument("--on-error", default="skip", choices=["skip", "fail"],
                   help="bad records: skip and count them (default), or stop at the first")
    o.add_argument("--shard-index", type=int, default=None,
                   help="this process's shard (default: $RANK under torchrun, else 0)")
    o.add_argument("--num-shards", type=int, default=None,
                   help="split the input files across this many shards (default: $WORLD_SIZE, else 1)")
    o.add_argument("--overwrite", action="store_true",
                   help="redo a run/shard even if its stats file says it finished")
    o.add_argument("--verify-inputs", action="store_true",
                   help="reuse a finished run only if every input's sha256 matches (default: "
                        "size, mtime and a hash of the first/last MiB; sha256 when mtime differs)")
    o.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between progress lines on stderr (0: none)")
    return p


def config_from_args(args: argparse.Namespace):
    from megapre.data.preprocess.pipeline import PreprocessConfig, UsageError
    if args.lang.lower() not in ("english", "en"):
        raise UsageError(f"--lang {args.lang}: the offline sentence splitter supports english only")
    tok = tokenizer_config_from_args(args)
    return PreprocessConfig(
        inputs=list(args.input), output_prefix=args.output_prefix, tokenizer=tok,
        json_keys=tuple(args.json_keys), input_format=args.input_format, text_mode=args.text_mode,
        append_eod=args.append_eod, split_sentences=args.split_sentences,
        keep_newlines=args.keep_newlines, workers=args.workers, batch_bytes=args.batch_bytes,
        on_error=args.on_error, shard_index=args.shard_index, num_shards=args.num_shards,
        overwrite=args.overwrite, progress_interval=args.progress_interval,
        verify_inputs=args.verify_inputs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    from megapre.data.preprocess.pipeline import DiskFullError, UsageError, run_preprocess

    try:
        report = run_preprocess(config_from_args(args))
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as e:
        print(f"{parser.prog}: error: bad input (--on-error fail): {e}", file=sys.stderr)
        return EXIT_FAILURE
    except DiskFullError as e:
        print(f"{parser.prog}: error: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was published", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, RuntimeError) as e:   # I/O, corrupt compressed input, a worker that died
        print(f"{parser.prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - unexpected: keep the traceback for the bug report
        traceback.print_exc()
        print(f"{parser.prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return report.exit_code
