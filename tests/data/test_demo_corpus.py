"""The quickstart's built-in corpus: real docstring text, deterministic, written atomically."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megapre.cli import make_demo_corpus
from megapre.data import demo_corpus

ROOT = Path(__file__).resolve().parents[2]


def test_corpus_is_real_text_and_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        assert make_demo_corpus.main(["--output", str(out), "--sources", "stdlib", "--max-mb", "0.3"]) == 0
    assert a.read_bytes() == b.read_bytes()
    docs = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(docs) > 10
    assert all(d["source"].startswith("stdlib:") and len(d["text"]) >= 200 for d in docs)
    text = " ".join(d["text"] for d in docs)
    assert 0.3e6 <= len(text) < 0.5e6
    assert text.count(" the ") > 100  # English prose, not code
    assert not list(tmp_path.glob(".*tmp*"))


def test_module_text_skips_unparsable_and_short(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def (:\n")
    assert demo_corpus.module_text(bad, 10) is None
    short = tmp_path / "short.py"
    short.write_text('"""Too short to be worth a document, but long enough."""\n')
    assert demo_corpus.module_text(short, 1000) is None
    assert demo_corpus.module_text(short, 10).startswith("Too short")


def test_cli_rejects_bad_sources(tmp_path):
    out = tmp_path / "x.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_corpus.py"), "--output",
                           str(out), "--sources", "stdlib,perl"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and "--sources" in proc.stderr and "perl" in proc.stderr
    assert not out.exists()
