"""`python tools/make_authorship_task.py --corpus BOOKS.txt --manifest manifest.tsv --out-dir DIR`
(console `megapre-make-authorship-task`): write DIR/train.tsv and DIR/test.tsv, passages labelled
by their author, with each author's last book held out whole for the test set
(megapre/data/authorship.py). Fine-tune on them with
`megapre-finetune --train-data DIR/train.tsv --test-data DIR/test.tsv --text-key text`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megapre.cli.common import prog_name
from megapre.data.authorship import AuthorshipConfig, build_task, read_manifest, write_tsv


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("make_authorship_task.py"),
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True,
                   help="the books concatenated in manifest order (e.g. gutenberg_en_24MiB.txt)")
    p.add_argument("--manifest", type=Path, required=True,
                   help="TSV: author, file_in_repo, git_blob_sha1, bytes_in_corpus")
    p.add_argument("--out-dir", type=Path, required=True)
    d = AuthorshipConfig()
    p.add_argument("--words", type=int, default=d.words, help="words per passage")
    p.add_argument("--max-train", type=int, default=d.max_train,
                   help="training passages per author (sampled)")
    p.add_argument("--max-test", type=int, default=d.max_test,
                   help="test passages per author (sampled from the held-out book)")
    p.add_argument("--min-books", type=int, default=d.min_books,
                   help="leave out authors with fewer books (at least 2: one is held out)")
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)
    for flag in ("words", "max_train", "max_test"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("corpus", "manifest"):
        if not getattr(args, flag).is_file():
            p.error(f"--{flag} {getattr(args, flag)}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    corpus = args.corpus.read_bytes()
    try:
        books = read_manifest(args.manifest, len(corpus))
        cfg = AuthorshipConfig(args.words, args.max_train, args.max_test, args.min_books,
                               args.seed)
        task, dropped = build_task(corpus, books, cfg)
    except (ValueError, UnicodeDecodeError) as e:
        print(f"{prog_name('make_authorship_task.py')}: error: {e}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in task.items():
        write_tsv(args.out_dir / f"{split}.tsv", rows)
    authors = sorted({a for _, a in task["train"]})
    print(f"{prog_name('make_authorship_task.py')}: {len(authors)} authors, {len(task['train'])} training and "
          f"{len(task['test'])} test passages of {args.words} words in {args.out_dir} "
          f"(each author's last book held out for test.tsv; {dropped} of its passages dropped "
          "as a training book holds the same text)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
