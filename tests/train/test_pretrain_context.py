"""`megapre.pretrain --context-parallel-size 2` under torchrun (CP2 x DP2) trains and evaluates
like one process, with document-reset positions and attention masks (the ring gets each rank's
mask rows over the whole sequence's columns) and RoPE at true positions; its checkpoint is
evaluated by `megapre.evaluate` in one process (inference runs without CP)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_counting_corpus

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 40


def _args(corpus: str, out: Path, *extra: str) -> list[str]:
    return ["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "10", "--lr", "3e-3",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-interval", "10",
            "--eval-iters", "2", "--log-interval", "5", "--data-path", corpus,
            "--split", "90,5,5", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(VOCAB - 1), "--make-vocab-size-divisible-by", "8",
            "--num-workers", "0", "--device", "cpu", "--position-embedding-type", "rope",
            "--reset-position-ids", "--reset-attention-mask",
            "--data-cache-path", str(out / "cache"), "--metrics-path", str(out / "metrics.jsonl"),
            *extra]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_cp2_dp2_matches_single_process(tmp_path):
    corpus = str(write_counting_corpus(tmp_path / "count_text_document", docs=400))
    one, four = tmp_path / "one", tmp_path / "four"
    one.mkdir(), four.mkdir()
    p1 = _run([sys.executable, "-m", "megapre.pretrain", *_args(corpus, one)], one)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p4 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "4", "-m", "megapre.pretrain", *_args(corpus, four),
               "--context-parallel-size", "2", "--save", str(four / "ckpt")], four)
    assert p4.returncode == 0, p4.stderr[-3000:]
    assert "CP 2 x PP 1 x DP 2" in p4.stdout
    m1, m4 = _metrics(one), _metrics(four)
    assert len(m1) == len(m4) == 4  # iterations 5 and 10, then valid and test
    for a, b in zip(m1, m4):
        assert (a["iteration"], a.get("split")) == (b["iteration"], b.get("split"))
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        if "grad_norm" in a:
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    ev = _run([sys.executable, "-m", "megapre.evaluate", "--load", str(four / "ckpt"),
               "--eval-split", "test", "--eval-iters", "2", "--device", "cpu",
               "--output-json", str(four / "eval.json")], four)
    assert ev.returncode == 0, ev.stderr[-3000:]
    record = json.loads((four / "eval.json").read_text())
    assert record["iteration"] == 10 and record["layout"]["dp"] == 1
    assert record["loss"] == pytest.approx(m1[-1]["loss"], rel=1e-5)  # the run's test loss
