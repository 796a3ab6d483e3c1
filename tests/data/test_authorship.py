"""The authorship task: whole books held out, manifests checked against the corpus, and the
shared Gutenberg corpus turned into 19 authors' passages."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megapre.cli.make_authorship_task import main
from megapre.data.authorship import HEADER, AuthorshipConfig, build_task, read_manifest
from megapre.data.tasks import TaskColumns, read_task_file

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "gutenberg"


def _book(word: str, n: int) -> str:
    return " ".join(f"{word}{i}" for i in range(n)) + "\n\n"


def _write(tmp: Path, books: list[tuple[str, str, str]], *, bytes_delta: int = 0):
    """books: (author, title, text) -> corpus and manifest paths."""
    corpus = "".join(text for _, _, text in books).encode()
    rows = [f"{a}\t{t}\t{'ab' * 20}\t{len(text.encode())}" for a, t, text in books]
    if bytes_delta:
        last = rows[-1].rsplit("\t", 1)
        rows[-1] = f"{last[0]}\t{int(last[1]) + bytes_delta}"
    (tmp / "books.txt").write_bytes(corpus)
    (tmp / "manifest.tsv").write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    return tmp / "books.txt", tmp / "manifest.tsv"


BOOKS = [("Ann", "First", _book("ann", 500)), ("Bob", '"Quoted":\nwith a line break', _book("bob", 400)),
         ("Ann", "Second", _book("zed", 300)), ("Bob", "Later", _book("yak", 300)),
         ("Cat", "Only", _book("cat", 300))]


def test_whole_books_are_held_out(tmp_path):
    corpus, manifest = _write(tmp_path, BOOKS)
    books = read_manifest(manifest, corpus.stat().st_size)
    assert books[1].title == '"Quoted":\nwith a line break'
    assert [(b.start, b.end) for b in books][:2] == [(0, len(BOOKS[0][2])),
                                                     (len(BOOKS[0][2]), len(BOOKS[0][2]) + len(BOOKS[1][2]))]
    task, dropped = build_task(corpus.read_bytes(), books,
                               AuthorshipConfig(words=50, max_train=5, max_test=3))
    assert dropped == 0
    train, test = task["train"], task["test"]
    assert {a for _, a in train} == {a for _, a in test} == {"Ann", "Bob"}  # Cat: one book
    # training passages come from the first books only, test passages from the held-out ones
    assert all(p.split()[0][:3] in ("ann", "bob") for p, _ in train)
    assert all(p.split()[0][:3] in ("zed", "yak") for p, _ in test)
    assert len(train) == 10 and len(test) == 6
    assert all(len(p.split()) == 50 and "\t" not in p and "\n" not in p for p, _ in train + test)
    # the first and last windows (credits, endings) are dropped
    assert not any(p.startswith("ann0 ") for p, _ in train)


def test_cli_writes_tsv_the_finetuner_reads(tmp_path, capsys):
    corpus, manifest = _write(tmp_path, BOOKS)
    out = tmp_path / "task"
    assert main(["--corpus", str(corpus), "--manifest", str(manifest), "--out-dir", str(out),
                 "--words", "40", "--max-train", "4", "--max-test", "2"]) == 0
    assert ": 2 authors, 8 training and 4 test passages" in capsys.readouterr().out
    read = read_task_file(out / "train.tsv", TaskColumns(text_key="text"))
    assert len(read.examples) == 8 and read.skipped_empty == 0
    assert sorted({e.label for e in read.examples}) == ["Ann", "Bob"]
    assert all(len(e.text.split()) == 40 for e in read.examples)


@pytest.mark.parametrize("case,message", [
    ("bytes", "add up to"),
    ("header", "expected the header"),
    ("garbled", "line 3 is not"),
    ("one-author", "only 1 author(s)"),
])
def test_bad_manifest_is_one_line_error(tmp_path, capsys, case, message):
    books = BOOKS if case != "one-author" else [b for b in BOOKS if b[0] == "Ann"]
    corpus, manifest = _write(tmp_path, books, bytes_delta=5 if case == "bytes" else 0)
    if case == "header":
        manifest.write_text("name\tbytes\n" + manifest.read_text().split("\n", 1)[1])
    if case == "garbled":
        lines = manifest.read_text().split("\n")
        lines[2] = "just some words"
        manifest.write_text("\n".join(lines))
    assert main(["--corpus", str(corpus), "--manifest", str(manifest), "--out-dir",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o" / "train.tsv").exists()


@pytest.mark.skipif(not (SHARED / "manifest.tsv").is_file(),
                    reason=f"the shared Gutenberg corpus is not at {SHARED}")
def test_gutenberg_corpus_gives_19_authors(tmp_path):
    out = tmp_path / "task"
    assert main(["--corpus", str(SHARED / "gutenberg_en_24MiB.txt"), "--manifest",
                 str(SHARED / "manifest.tsv"), "--out-dir", str(out)]) == 0
    cols = TaskColumns(text_key="text")
    train = read_task_file(out / "train.tsv", cols).examples  # as the fine-tuner reads them
    test = read_task_file(out / "test.tsv", cols).examples
    assert len({e.label for e in train}) == len({e.label for e in test}) == 19
    assert all(len(e.text.split()) == 128 for e in train + test)
    assert not {e.text for e in train} & {e.text for e in test}  # a shared preface is dropped
    assert len(train) > 4000 and len(test) > 1500


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_text_shared_with_a_training_book_leaves_the_test_set(tmp_path):
    shared = _book("pre", 100)
    books = [("Ann", "A", shared + _book("ann", 300)), ("Ann", "B", shared + _book("zed", 300)),
             ("Bob", "C", _book("bob", 300)), ("Bob", "D", _book("yak", 300))]
    corpus, manifest = _write(tmp_path, books)
    task, dropped = build_task(corpus.read_bytes(), read_manifest(manifest, corpus.stat().st_size),
                               AuthorshipConfig(words=50))
    assert dropped == 1  # the preface's second window ("pre50".."pre99"); the first is dropped anyway
    assert not any(p.startswith("pre") for p, _ in task["test"])
