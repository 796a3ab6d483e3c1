"""Preprocessing guard rails (issue 10): reruns that notice changed inputs, one run per prefix,
temporaries of killed runs removed, blank lines as separators, a directory as --output-prefix,
ENOSPC named in one line, and long documents tokenized in bounded memory."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from megapre.cli.preprocess_data import main
from megapre.data.indexed import IndexedDataset
from megapre.data.preprocess import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from megapre.data.preprocess.chunking import encode_long, pieces
from megapre.data.preprocess.pipeline import prefix_lock
from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

BYTE = ["--tokenizer-type", "ByteLevelTokenizer"]


def run(*argv) -> int:
    return main([*map(str, argv), "--progress-interval", "0", "--workers", "0"])


def tokens(prefix) -> list[int]:
    ds = IndexedDataset(prefix)
    return np.concatenate([ds[i] for i in range(len(ds))]).tolist()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- reruns

def test_rerun_redoes_when_an_input_changed_but_kept_its_size(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n")
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_OK
    assert tokens(tmp_path / "p_text_document") == list(b"hello world")
    src.write_text("HELLO WORLD\n")                       # same size, new content
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_OK
    assert tokens(tmp_path / "p_text_document") == list(b"HELLO WORLD")
    assert "changed since the finished run" in capsys.readouterr().err


def test_unchanged_rerun_is_skipped_and_verify_inputs_catches_a_preserved_mtime(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("x" * 3_000_000 + "\n")               # middle outside the head/tail hash
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_OK
    capsys.readouterr()
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_OK
    assert "skipping" in capsys.readouterr().err
    st = src.stat()
    with open(src, "r+b") as f:                          # edit the middle, keep size and mtime
        f.seek(1_500_000)
        f.write(b"y")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_OK
    assert "skipping" in capsys.readouterr().err         # default: size + mtime + edges agree
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE, "--verify-inputs") == EXIT_OK
    assert "sha256 changed" in capsys.readouterr().err
    assert tokens(tmp_path / "p_text_document")[1_500_000] == ord("y")


# ----------------------------------------------------------------------------- the prefix lock

def test_second_run_on_a_locked_prefix_fails_naming_the_owner(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello\n")
    with prefix_lock(str(tmp_path / "p")):
        assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {os.getpid()} on host {socket.gethostname()}" in err[0]
    assert "p.lock" in err[0] and not (tmp_path / "p_text_document.bin").exists()
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_OK  # released
    assert not (tmp_path / "p.lock").exists()


def test_two_concurrent_runs_on_one_prefix_one_is_refused(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("some words on a line\n" * 1_000_000)
    cmd = [sys.executable, "-m", "megapre.data.preprocess", "--input", str(src), "--output-prefix",
           str(tmp_path / "p"), "--workers", "1", "--progress-interval", "0", *BYTE]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    deadline = time.monotonic() + 60
    while not (tmp_path / "p.lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_USAGE
    assert f"pid {first.pid} on host" in capsys.readouterr().err
    assert first.wait(timeout=120) == EXIT_OK, first.stderr.read()
    assert IndexedDataset(tmp_path / "p_text_document").num_documents == 1_000_000


def test_stale_lock_and_temporaries_of_a_killed_run_are_removed(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello\n")
    pid = dead_pid()
    (tmp_path / "p.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    stale = [tmp_path / f"p_text_document.bin.tmp-{pid}-abcd1234",
             tmp_path / f"p.errors.jsonl.tmp{pid}"]
    live = tmp_path / f"p_text_document.bin.tmp-{os.getppid()}-abcd1234"   # a running pid
    for f in (*stale, live):
        f.write_bytes(b"junk")
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_OK
    assert not any(f.exists() for f in stale) and live.exists()
    assert "stale lock" in capsys.readouterr().err


# ----------------------------------------------------------------------------- input handling

def test_blank_lines_in_plain_text_are_separators_not_errors(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("one\n\n\ntwo\n   \nthree\n")
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_OK
    assert IndexedDataset(tmp_path / "p_text_document").num_documents == 3
    assert not (tmp_path / "p.errors.jsonl").exists()


@pytest.mark.parametrize("suffix", ["/", ""])
def test_directory_output_prefix_is_refused(tmp_path, capsys, suffix):
    src = tmp_path / "a.txt"
    src.write_text("one\n")
    (tmp_path / "out").mkdir()
    assert run("--input", src, "--output-prefix", f"{tmp_path / 'out'}{suffix}", *BYTE) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out/corpus" in err[0] and "is a directory" in err[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_disk_full_is_one_line_and_removes_partial_outputs(tmp_path, capsys, monkeypatch):
    from megapre.data import indexed

    def full(self, data):
        self.abort()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(indexed.IndexedDatasetBuilder, "_write", full)
    src = tmp_path / "a.txt"
    src.write_text("one\ntwo\n")
    assert run("--input", src, "--output-prefix", tmp_path / "p", *BYTE) == EXIT_FAILURE
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    line = err[-1]
    assert line.startswith("preprocess_data.py: error: ") and "no space left on device" in line
    assert str(tmp_path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ----------------------------------------------------------------------------- long documents

def _gpt2(vocab: Path | None = None):
    gpt2 = SHARED_DATA / "gpt2"
    if not (gpt2 / "vocab.json").is_file():
        pytest.skip(f"GPT-2 files absent under {gpt2}")
    return TokenizerConfig("GPT2BPETokenizer", vocab_file=str(vocab or gpt2 / "vocab.json"),
                           merge_file=str(gpt2 / "merges.txt"))


def _text(n_chars: int) -> str:
    book = SHARED_DATA / "gutenberg" / "gutenberg_en_24MiB.txt"
    if book.is_file():
        with open(book, encoding="utf-8") as f:
            return f.read(n_chars)
    rng = np.random.default_rng(0)
    words = ["the", "of", "and", "to", "in", "Mr.", "said,", "\n\n", "  ", "don't", "42", "caf\u00e9"]
    return " ".join(rng.choice(words, n_chars // 4))[:n_chars]


def test_pieces_cut_before_a_word_and_rejoin_to_the_text():
    text = _text(300_000)
    parts = list(pieces(text, 5000))
    assert "".join(parts) == text and max(map(len, parts)) <= 5000
    assert all(p[0] == " " and not p[1].isspace() for p in parts[1:])
    assert list(pieces("x" * 25, 10)) == ["x" * 10, "x" * 10, "x" * 5]     # no space: hard cut


def test_long_document_ids_equal_whole_document_gpt2_ids():
    tok = build_tokenizer(_gpt2())
    text = _text(400_000)
    whole = tok.encode(text)
    for max_chars in (1000, 1 << 14):
        assert encode_long(lambda p: tok.encode_batch([p])[0], text, max_chars).tolist() == whole


def _hf_gpt2(tmp_path: Path) -> TokenizerConfig:
    """GPT-2 plus one token: the `tokenizers` engine (the one that holds per-token encodings)
    instead of tiktoken, same ids otherwise."""
    cfg = _gpt2()
    vocab = json.loads(Path(cfg.vocab_file).read_text(encoding="utf-8"))
    vocab["<|extra|>"] = len(vocab)
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(vocab), encoding="utf-8")
    return _gpt2(path)


def test_50mb_record_is_tokenized_in_bounded_worker_memory(tmp_path):
    """One 50 MB JSONL record: before chunking the worker's peak RSS was ~130 bytes per character
    (~6.5 GB); now it stays under 1 GB (the record itself and its ids are held a few times). Run
    as its own process, so the stats' largest_worker (RUSAGE_CHILDREN) sees only its worker."""
    tok = _hf_gpt2(tmp_path)
    assert build_tokenizer(tok).engine == "tokenizers"
    unit = " information about the international"
    n = 50_000_000 // len(unit)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": unit * n}) + "\n")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "megapre.data.preprocess", "--input", str(tmp_path / "big.jsonl"),
         "--output-prefix", str(tmp_path / "p"), "--workers", "1", "--progress-interval", "0",
         "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tok.vocab_file,
         "--merge-file", tok.merge_file],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == EXIT_OK, proc.stderr
    stats = json.loads((tmp_path / "p.stats.json").read_text())
    assert stats["documents"] == 1 and stats["tokens"]["text"] == 4 * n
    assert stats["peak_rss_mb"]["largest_worker"] < 1000, stats["peak_rss_mb"]
    assert time.perf_counter() - t0 < 120
