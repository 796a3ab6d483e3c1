"""An authorship task from a book corpus and its manifest: passages labelled by their author,
with whole books held out for the test set, so a model must recognize an author's style in a
book it never saw rather than remember a plot, names or a book's front matter.

The corpus is the books concatenated in manifest order; the manifest is a TSV with the header
`author, file_in_repo, git_blob_sha1, bytes_in_corpus` (the shared Gutenberg corpus's
`manifest.tsv`). File names may hold quotes and even line breaks, so a record is recognized by
its tail: a 40-hex blob id and a byte count.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

HEADER = "author\tfile_in_repo\tgit_blob_sha1\tbytes_in_corpus"
_RECORD = re.compile(r"([^\t\n]*)\t(.*?)\t([0-9a-f]{40})\t(\d+)\n", re.S)


@dataclass(frozen=True)
class Book:
    author: str
    title: str
    start: int  # byte offsets into the corpus
    end: int


@dataclass(frozen=True)
class AuthorshipConfig:
    words: int = 128          # words per passage
    max_train: int = 300      # passages per author from the training book(s)
    max_test: int = 100       # passages per author from the held-out book
    min_books: int = 2        # authors with fewer books are left out (nothing to hold out)
    seed: int = 1


def read_manifest(path: Path, corpus_bytes: int) -> list[Book]:
    """Books with their byte ranges; refuses a manifest that does not tile the corpus."""
    text = path.read_text(encoding="utf-8")
    head, _, body = text.partition("\n")
    if head.strip() != HEADER:
        raise ValueError(f"{path}: line 1 is {head.strip()[:80]!r}; expected the header "
                         f"{HEADER!r}")
    if not body.endswith("\n"):
        body += "\n"
    def malformed(pos: int) -> ValueError:
        line = text.count("\n", 0, len(head) + 1 + pos) + 1
        return ValueError(f"{path}: line {line} is not 'author<TAB>file<TAB>sha1<TAB>bytes'")

    books, pos, offset = [], 0, 0
    for m in _RECORD.finditer(body):
        if m.start() != pos:
            raise malformed(pos)
        size = int(m.group(4))
        books.append(Book(m.group(1).strip(), m.group(2).strip(), offset, offset + size))
        offset, pos = offset + size, m.end()
    if body[pos:].strip():
        raise malformed(pos)
    if not books:
        raise ValueError(f"{path}: no book records after the header")
    if offset != corpus_bytes:
        raise ValueError(f"{path}: the books add up to {offset:,} bytes but the corpus has "
                         f"{corpus_bytes:,}; pass the manifest that belongs to this corpus")
    return books


def split_books(books: list[Book], min_books: int) -> tuple[list[Book], list[Book]]:
    """(training books, held-out books): each author's last book in manifest order is held out;
    authors with fewer than `min_books` books are left out."""
    by_author: dict[str, list[Book]] = {}
    for b in books:
        by_author.setdefault(b.author, []).append(b)
    kept = {a: bs for a, bs in by_author.items() if len(bs) >= max(2, min_books)}
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} author(s) have >= {max(2, min_books)} books; an "
                         "authorship task needs two authors with a book to hold out each")
    train = [b for bs in kept.values() for b in bs[:-1]]
    return train, [bs[-1] for bs in kept.values()]


def passages(text: str, words: int) -> list[str]:
    """Consecutive `words`-word windows, whitespace collapsed (no tabs or line breaks survive).
    The first and last windows are dropped: they hold the transcriber's credits and endings."""
    tokens = text.split()
    windows = [" ".join(tokens[i:i + words]) for i in range(0, len(tokens) - words + 1, words)]
    return windows[1:-1]


def _sample(items: list[str], n: int, rng: random.Random) -> list[str]:
    return items if len(items) <= n else rng.sample(items, n)


def build_task(corpus: bytes, books: list[Book], cfg: AuthorshipConfig
               ) -> tuple[dict[str, list[tuple[str, str]]], int]:
    """({'train': [(passage, author)], 'test': [...]}, each shuffled with `cfg.seed`; the number
    of held-out passages dropped because a training book holds the same text, e.g. a preface
    an author's two books share)."""
    rng = random.Random(cfg.seed)
    train_books, test_books = split_books(books, cfg.min_books)
    seen: set[str] = set()
    out: dict[str, list[tuple[str, str]]] = {}
    dropped = 0
    for split, chosen, cap in (("train", train_books, cfg.max_train),
                               ("test", test_books, cfg.max_test)):
        per_author: dict[str, list[str]] = {}
        for b in chosen:
            text = corpus[b.start:b.end].decode("utf-8", errors="replace")
            found = passages(text, cfg.words)
            if split == "train":
                seen.update(found)
            else:
                dropped += sum(p in seen for p in found)
                found = [p for p in found if p not in seen]
            per_author.setdefault(b.author, []).extend(found)
        rows = [(p, a) for a, ps in per_author.items() for p in _sample(ps, cap, rng)]
        rng.shuffle(rows)
        out[split] = rows
    return out, dropped


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    """`text<TAB>label` with a header, written to a temporary name and renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("text\tlabel\n")
        for text, label in rows:
            f.write(f"{text}\t{label}\n")
    tmp.replace(path)
