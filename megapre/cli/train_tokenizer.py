"""`python tools/train_tokenizer.py --kind sentencepiece|byte-bpe|wordpiece|char --input ...
--output-dir DIR` (console `megapre-train-tokenizer`): train a tokenizer on a corpus and print the
flags that load it (megapre/data/train_tokenizer.py does the work).
Exit codes: 0 trained; 1 bad input or failed training (message on stderr); 2 bad flags."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from megapre.data.tokenizer.corpus import INPUT_FORMATS, TEXT_MODES
from megapre.data.train_tokenizer import KINDS, TrainingConfig, run
from megapre.cli.common import prog_name


def parse_args(argv: Sequence[str] | None) -> TrainingConfig:
    p = argparse.ArgumentParser(
        prog=prog_name("train_tokenizer.py"), description="Train a SentencePiece, byte-level BPE, WordPiece or character "
                    "tokenizer on a corpus.",
        epilog="Outputs go to OUTPUT_DIR/OUTPUT_PREFIX.* (plus OUTPUT_PREFIX.train.json, the run's summary); "
               "the flags that load them are printed. Exit codes: 0 trained, 1 bad input or failed "
               "training (message on stderr), 2 bad flags.",
    )
    p.add_argument("--kind", choices=KINDS, required=True, help="what to train")
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (JSONL, text, Parquet; .gz/.zst)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--output-prefix", default="tokenizer", help="file name stem inside --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g = p.add_argument_group("input")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL/Parquet fields holding text")
    g.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    g.add_argument("--text-mode", choices=TEXT_MODES, default="line",
                   help="plain-text inputs (.txt): 'line' (default) makes every line a document "
                        "(blank lines are skipped); 'blank-line' makes every paragraph one "
                        "document, the better choice for books and other hard-wrapped prose")
    g.add_argument("--max-documents", type=int, help="read at most this many documents (spread over the files)")
    g.add_argument("--sample-bytes", type=_size, help="read at most this much text, e.g. 2G (spread over the files)")
    g.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="bad records: count and skip, or stop")
    g = p.add_argument_group("model")
    g.add_argument("--vocab-size", type=int, help="vocabulary size (default 32000; wordpiece 30522)")
    g.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram", help="sentencepiece algorithm")
    g.add_argument("--character-coverage", type=float, default=0.9995, help="sentencepiece: share of characters kept (1.0 for small alphabets)")
    g.add_argument("--byte-fallback", action="store_true", help="sentencepiece: unknown characters become UTF-8 byte pieces")
    g.add_argument("--max-sentences", type=int, default=5_000_000, help="sentencepiece: sentences sampled into memory")
    g.add_argument("--max-sentence-length", type=int, default=4192, help="sentencepiece: longer lines are cut at spaces")
    g.add_argument("--min-frequency", type=int, default=2, help="byte-bpe: minimum pair count for a merge")
    g.add_argument("--cased", action="store_true", help="wordpiece: keep case and accents (BertWordPieceCase)")
    g.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens (byte-bpe: added after <|endoftext|>; sentencepiece: user-defined symbols)")
    g.add_argument("--char-specials", nargs="*", default=[], choices=("eod", "pad", "unk"), help="char: special tokens after the characters")
    g.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    g.add_argument("--verbose", action="store_true", help="show the trainer's own log")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.kind == "char":
        p.error("--vocab-size does not apply to --kind char (the vocabulary is the corpus's characters)")
    if args.cased and args.kind != "wordpiece":
        p.error("--cased applies to --kind wordpiece only")
    for name in ("max_documents", "sample_bytes", "vocab_size", "max_sentences", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive (got {value})")
    if not 0 < args.character_coverage <= 1:
        p.error(f"--character-coverage must be in (0, 1] (got {args.character_coverage})")
    return TrainingConfig(**vars(args))


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500M, 2G, 1000000)") from None


def report(summary: dict) -> str:
    c = summary["corpus"]
    lines = [
        f"trained {summary['kind']} in {summary['seconds']:.1f} s on {c['documents']:,} documents "
        f"({c['bytes'] / 1e6:.1f} MB) from {len(c['files'])} file(s)"
        + (" (stopped at the --max-documents/--sample-bytes cap)" if c["truncated"] else ""),
    ]
    if c["skipped"]:
        lines.append("skipped: " + ", ".join(f"{n:,} {reason}" for reason, n in c["skipped"].items()))
        lines += [f"  {e}" for e in c["examples"]]
    lines.append("wrote: " + ", ".join(summary["files"]))
    for flags, chk in zip(summary["flags"], summary["check"]):
        tok = chk["tokenizer"]
        lines.append(
            f"use with: {flags}\n  vocab {tok['vocab_size']:,}, eod {tok['special_ids']['eod']}; on {chk['documents']} "
            f"training documents: {chk['bytes_per_token']} bytes/token, round trips: {chk['exact_round_trips']} exact, "
            f"{chk['round_trips_ignoring_whitespace']} ignoring whitespace"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 1
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
