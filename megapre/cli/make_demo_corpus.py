"""`python tools/make_demo_corpus.py --output demo.jsonl [--sources stdlib,torch,numpy]
[--max-mb 8]` (console `megapre-make-demo-corpus`): write the quickstart's built-in corpus, the
docstrings of the installed standard library, torch and numpy (megapre/data/demo_corpus.py).
`--task-output PREFIX` writes the built-in labelled task beside (or instead of) it:
PREFIX.{train,valid,test}.jsonl, docstring paragraphs labelled by their library.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megapre.data.demo_corpus import SOURCES, write_corpus, write_task
from megapre.cli.common import prog_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("make_demo_corpus.py"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, help="JSONL file to write ({'text', 'source'} per line)")
    p.add_argument("--task-output", type=Path, metavar="PREFIX",
                   help="also write the labelled task PREFIX.{train,valid,test}.jsonl "
                        "({'text', 'label' (stdlib/torch/numpy), 'source'} per line)")
    p.add_argument("--task-rows", type=int, default=1000,
                   help="training rows per label of the task (valid/test: an eighth each)")
    p.add_argument("--sources", default=",".join(SOURCES),
                   help=f"comma list of {', '.join(SOURCES)} (default: all)")
    p.add_argument("--max-mb", type=float, default=8.0, help="stop after this many MB of text (default 8)")
    p.add_argument("--min-chars", type=int, default=200, help="skip modules with less docstring text")
    args = p.parse_args(argv)
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    bad = [s for s in args.sources if s not in SOURCES]
    if bad or not args.sources:
        p.error(f"--sources: unknown {bad or 'empty list'}; choose from {', '.join(SOURCES)}")
    if args.output is None and args.task_output is None:
        p.error("give --output FILE (the corpus) and/or --task-output PREFIX (the labelled task)")
    if args.task_rows < 1:
        p.error(f"--task-rows must be >= 1, got {args.task_rows}")
    if args.max_mb <= 0:
        p.error(f"--max-mb must be > 0, got {args.max_mb}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output is not None:
        stats = write_corpus(args.output, args.sources, int(args.max_mb * 1e6), args.min_chars)
        print(f"make_demo_corpus: wrote {stats['documents']} documents, "
              f"{stats['characters'] / 1e6:.1f} M characters to {stats['output']}")
    if args.task_output is not None:
        counts = write_task(args.task_output, args.sources, args.task_rows)
        print(f"make_demo_corpus: wrote the labelled task {args.task_output}.{{train,valid,test}}"
              f".jsonl ({', '.join(f'{k} {v}' for k, v in counts.items())} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
