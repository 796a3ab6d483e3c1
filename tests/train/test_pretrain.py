"""The pretraining program end to end: `python -m megapre.pretrain` learns, logs the metrics a
user reads, evaluates, and under torchrun (TP2, DP2; DP4 with two distributed-optimizer
instances) gives the single process's losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA, write_counting_corpus

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Documents of counting sequences (t, t+k, t+2k, ... mod VOCAB-1) ending in EOD: easy to
    learn, so a few dozen steps visibly lower the loss."""
    return write_counting_corpus(tmp_path_factory.mktemp("corpus") / "count_text_document", docs=400)


def _args(corpus: str, out: Path, *extra: str) -> list[str]:
    return ["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "30", "--lr", "3e-3",
            "--lr-warmup-iters", "3", "--min-lr", "3e-4", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--eval-interval", "15", "--eval-iters", "2",
            "--log-interval", "5", "--data-path", corpus, "--split", "90,5,5",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
            "--make-vocab-size-divisible-by", "8", "--num-workers", "0", "--device", "cpu",
            "--data-cache-path", str(out / "cache"), "--metrics-path", str(out / "metrics.jsonl"),
            *extra]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _metrics(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r], [r for r in rows if "split" in r]


@pytest.mark.slow
def test_single_process_learns_and_logs(corpus, tmp_path):
    proc = _run([sys.executable, "-m", "megapre.pretrain", *_args(corpus, tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, evals = _metrics(tmp_path)
    assert [r["iteration"] for r in train] == [5, 10, 15, 20, 25, 30]
    for r in train:
        assert {"iteration", "consumed_samples", "loss", "lr", "grad_norm", "tokens_per_s",
                "mfu"} <= r.keys()
    assert train[-1]["consumed_samples"] == 240
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
    assert [(r["split"], r["iteration"]) for r in evals] == [("valid", 15), ("valid", 30),
                                                            ("test", 30)]
    assert "run summary:" in proc.stdout and "lm loss" in proc.stdout


@pytest.mark.slow
def test_torchrun_tp2_dp2_matches_single_process(corpus, tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    one.mkdir(), four.mkdir()
    # Divisible by 24: the vocabulary pads to 48 rows under TP1 and TP2 alike, so the padded
    # rows (counted by the norm and the zeros, as Megatron counts them) are the same
    short = ["--train-iters", "10", "--eval-interval", "10", "--log-params-norm",
             "--log-num-zeros-in-grad", "--make-vocab-size-divisible-by", "24"]
    p1 = _run([sys.executable, "-m", "megapre.pretrain", *_args(corpus, one, *short)], one)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p4 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "4", "-m", "megapre.pretrain", *_args(corpus, four, *short),
               "--tensor-model-parallel-size", "2", "--log-interval", "5"], four)
    assert p4.returncode == 0, p4.stderr[-3000:]
    (t1, e1), (t4, e4) = _metrics(one), _metrics(four)
    assert len(t1) == len(t4) == 2
    assert len(e1) == len(e4) == 2  # valid and test at iteration 10
    for a, b in zip(t1 + e1, t4 + e4):
        assert a["iteration"] == b["iteration"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for a, b in zip(t1, t4):  # whole-model statistics, each element counted once
        assert b["params_norm"] == pytest.approx(a["params_norm"], rel=1e-5)
        # 8 padded rows x 32 are exactly zero; beyond them a gradient element that cancels to
        # exactly 0.0 in one summation order may not in another
        assert min(a["num_zeros_in_grad"], b["num_zeros_in_grad"]) >= 8 * 32
        assert abs(b["num_zeros_in_grad"] - a["num_zeros_in_grad"]) <= 2


@pytest.mark.slow
def test_torchrun_two_optimizer_instances_match_single_process(corpus, tmp_path):
    """DP4 with --use-distributed-optimizer --num-distributed-optimizer-instances 2 (and both
    overlaps) through the whole program: the losses, params norm and zero-gradient count of
    one process (the statistics taken once per shard, not once per instance)."""
    one, four = tmp_path / "one", tmp_path / "four"
    one.mkdir(), four.mkdir()
    short = ["--train-iters", "10", "--eval-interval", "10", "--log-params-norm",
             "--log-num-zeros-in-grad"]
    p1 = _run([sys.executable, "-m", "megapre.pretrain", *_args(corpus, one, *short)], one)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p4 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "4", "-m", "megapre.pretrain", *_args(corpus, four, *short),
               "--use-distributed-optimizer", "--num-distributed-optimizer-instances", "2",
               "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "2000"],
              four)
    assert p4.returncode == 0, p4.stderr[-3000:]
    (t1, e1), (t4, e4) = _metrics(one), _metrics(four)
    assert len(t1) == len(t4) == 2 and len(e1) == len(e4) == 2
    for a, b in zip(t1 + e1, t4 + e4):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for a, b in zip(t1, t4):
        assert b["params_norm"] == pytest.approx(a["params_norm"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        # a gradient element that cancels to exactly 0.0 in one summation order may not in
        # another (a key bias's); counted per instance it would double
        assert abs(b["num_zeros_in_grad"] - a["num_zeros_in_grad"]) <= 4


def test_megatron_style_run_on_mock_data(tmp_path):
    """Megatron's synthetic-data launch: --mock-data with a sample-based schedule, manual GC,
    deterministic mode and uniform full recomputation; the loss falls on the counting documents."""
    flags = ["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
             "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
             "--global-batch-size", "8", "--train-samples", "160", "--lr-warmup-samples", "16",
             "--lr", "3e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
             "100", "--split", "'99,1,0'", "--eval-iters", "1", "--eval-interval", "10",
             "--log-interval", "5", "--manual-gc", "--manual-gc-interval", "5",
             "--deterministic-mode", "--recompute-granularity", "full", "--recompute-method",
             "uniform", "--recompute-num-layers", "2", "--use-mcore-models", "--num-workers", "0",
             "--device", "cpu", "--data-cache-path", str(tmp_path / "cache"),
             "--metrics-path", str(tmp_path / "metrics.jsonl")]
    proc = _run([sys.executable, "-m", "megapre.pretrain", *flags], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no-ops" in proc.stdout and "--use-mcore-models" in proc.stdout
    train, evals = _metrics(tmp_path)
    assert [r["iteration"] for r in train] == [5, 10, 15, 20]  # 160 samples / 8
    # iteration 5 logs the lr of update 4: warmup 16/8 = 2, then linear decay over 20 - 2
    assert train[0]["lr"] == pytest.approx(3e-3 * (1 - (4 - 2) / 18), rel=1e-9)
    assert train[-1]["loss"] < train[0]["loss"] - 0.3, [r["loss"] for r in train]
    assert (tmp_path / "cache" / "mock").is_dir()


def test_bad_flag_exits_2_and_names_it(corpus, tmp_path):
    proc = _run([sys.executable, "-m", "megapre.pretrain",
                 *_args(corpus, tmp_path, "--num-attention-heads", "3")], tmp_path)
    assert proc.returncode == 2
    assert "--num-attention-heads" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_exits_2(tmp_path):
    proc = _run([sys.executable, "-m", "megapre.pretrain",
                 *_args(str(tmp_path / "nope_text_document"), tmp_path)], tmp_path)
    assert proc.returncode == 2
    assert "nope_text_document" in proc.stderr and "Traceback" not in proc.stderr


SHARED = SHARED_DATA


@pytest.mark.slow
def test_bert_pretraining_on_real_sentences(tmp_path):
    vocab, text = SHARED / "bert" / "vocab.txt", SHARED / "wikitext-2" / "valid.txt"
    if not (vocab.is_file() and text.is_file()):
        pytest.skip(f"needs {vocab} and {text} (../shared/data is absent)")
    corpus = tmp_path / "wiki.txt"
    corpus.write_text(text.read_text()[:300_000])
    prep = _run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus),
                 "--input-format", "text", "--text-mode", "blank-line", "--split-sentences",
                 "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(vocab),
                 "--output-prefix", str(tmp_path / "wiki"), "--workers", "0"], tmp_path)
    assert prep.returncode in (0, 3), prep.stderr[-2000:]
    args = ["--model", "bert", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "6", "--lr", "1e-3", "--eval-interval",
            "6", "--eval-iters", "1", "--log-interval", "3", "--data-path",
            str(tmp_path / "wiki_text_sentence"), "--split", "90,5,5", "--tokenizer-type",
            "BertWordPieceLowerCase", "--vocab-file", str(vocab), "--num-workers", "0",
            "--device", "cpu", "--metrics-path", str(tmp_path / "metrics.jsonl"),
            "--data-cache-path", str(tmp_path / "cache")]
    proc = _run([sys.executable, "-m", "megapre.pretrain", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, evals = _metrics(tmp_path)
    assert [r["iteration"] for r in train] == [3, 6]
    assert all("sop_loss" in r and "lm_loss" in r for r in train)
    assert abs(train[-1]["loss"] - train[-1]["lm_loss"] - train[-1]["sop_loss"]) < 1e-4
    assert [e["split"] for e in evals] == ["valid", "test"]


@pytest.mark.slow
def test_torchrun_distributed_optimizer_matches_single_process(corpus, tmp_path):
    """--use-distributed-optimizer with overlapped reduce-scatter and param all-gather (DP2)
    trains like one process; its checkpoint resumes in one process without the flag."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    short = ["--train-iters", "6", "--eval-interval", "6", "--log-interval", "3"]
    p1 = _run([sys.executable, "-m", "megapre.pretrain", *_args(corpus, one, *short)], one)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "-m", "megapre.pretrain", *_args(corpus, two, *short),
               "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
               "--ddp-bucket-size", "4000", "--save", str(two / "ckpt")], two)
    assert p2.returncode == 0, p2.stderr[-3000:]
    (t1, e1), (t2, e2) = _metrics(one), _metrics(two)
    assert len(t1) == len(t2) == 2 and len(e1) == len(e2) == 2
    for a, b in zip(t1 + e1, t2 + e2):
        assert a["iteration"] == b["iteration"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    p3 = _run([sys.executable, "-m", "megapre.pretrain",
               *_args(corpus, resumed, "--train-iters", "8", "--eval-interval", "100",
                      "--log-interval", "1", "--load", str(two / "ckpt"))], resumed)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert [r["iteration"] for r in _metrics(resumed)[0]] == [7, 8]


def test_overlap_param_gather_needs_the_distributed_optimizer(corpus, tmp_path):
    proc = _run([sys.executable, "-m", "megapre.pretrain",
                 *_args(corpus, tmp_path, "--overlap-param-gather")], tmp_path)
    assert proc.returncode == 2
    assert "--overlap-param-gather needs --use-distributed-optimizer" in proc.stderr
    assert "Traceback" not in proc.stderr
