"""What a run prints and writes: the train/eval log lines and the end-of-run table (golden
outputs), BERT perplexity from the LM loss alone, the metrics file of a fresh run rotated instead
of appended to, and start-up checks that name their flag."""
from __future__ import annotations

import io
import json

import pytest

from megapre.model.config import ConfigError
from megapre.train.args import PretrainConfig, validate
from megapre.train.metrics import (MetricsLogger, eval_record, format_duration, format_eval_line,
                                   format_summary, format_train_line, ordered_summary, rotate,
                                   write_summary)

GPT_RECORD = dict(iteration=50, train_iters=1000, consumed_samples=400, loss=2.481242, lr=3e-3,
                  grad_norm=0.732, skipped_iters=0, tokens_per_s=2887.4,
                  tflops_per_device=0.000519, mfu=0.0163, step_time_s=0.1602, elapsed_s=8.3,
                  eta_s=0.1602 * 950)


def test_train_line_golden():
    assert format_train_line(GPT_RECORD) == (
        "iteration   50/1000 | elapsed 0:00:08 | ETA 0:02:32 | 160.2 ms/iter | tokens/s 2887 | "
        "TFLOP/s/dev 0.000519 | MFU 1.6% | lm loss 2.481242e+00 | lr 3.0000e-03 | "
        "grad norm 0.7320 | consumed samples 400 | skipped 0")
    bert = dict(GPT_RECORD, lm_loss=7.2, sop_loss=0.69, loss=7.89, loss_scale=65536.0,
                iteration=1000, elapsed_s=3725.2, eta_s=0.0)
    assert format_train_line(bert) == (
        "iteration 1000/1000 | elapsed 1:02:05 | ETA 0:00:00 | 160.2 ms/iter | tokens/s 2887 | "
        "TFLOP/s/dev 0.000519 | MFU 1.6% | lm loss 7.200000e+00 | sop loss 6.900000e-01 | "
        "lr 3.0000e-03 | grad norm 0.7320 | consumed samples 400 | skipped 0 | "
        "loss scale 65536.0")


def test_duration_format():
    assert [format_duration(x) for x in (0, 59.6, 3600, 90061, float("nan"), -1)] == \
        ["0:00:00", "0:01:00", "1:00:00", "25:01:01", "?", "?"]


def test_bert_validation_perplexity_is_exp_of_lm_loss_only():
    """Issue 10 item 8: 35,720 = exp(lm + sop) was logged where megapre.evaluate says 15,571."""
    r = eval_record(200, "valid", 9.653 + 0.83, {"lm loss": 9.653, "sop loss": 0.83})
    assert r["ppl"] == pytest.approx(15568.42, rel=1e-5)
    assert r["loss"] == pytest.approx(10.483) and r["lm_loss"] == 9.653 and r["sop_loss"] == 0.83
    assert format_eval_line(r) == ("valid at iteration 200 | lm loss 9.653000e+00 | "
                                   "sop loss 8.300000e-01 | ppl 15568.423")
    gpt = eval_record(30, "test", 3.0, {})
    assert format_eval_line(gpt) == "test at iteration 30 | lm loss 3.000000e+00 | ppl 20.086"


def test_summary_table_golden(tmp_path):
    summary = ordered_summary({"start_iteration": 0, "iteration": 52, "consumed_samples": 416,
                               "elapsed_s": 8.3178, "exit_reason": "SIGTERM", "skipped_iters": 0,
                               "train_loss": 1.6880885, "valid_loss": None, "zeta": 1e-5})
    assert format_summary(summary) == "\n".join([
        "run summary:",
        "  exit_reason       SIGTERM",
        "  start_iteration   0",
        "  iteration         52",
        "  consumed_samples  416",
        "  train_loss        1.6881",
        "  valid_loss        -",
        "  skipped_iters     0",
        "  elapsed_s         0:00:08 (8.3 s)",
        "  zeta              1.0000e-05"])
    path = write_summary(str(tmp_path / "metrics.jsonl"), summary)
    assert path == str(tmp_path / "metrics.summary.json")
    assert json.loads((tmp_path / "metrics.summary.json").read_text())["iteration"] == 52


def test_fresh_run_rotates_old_metrics_and_resumed_run_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 5, "loss": 9.0}\n')
    (tmp_path / "metrics.jsonl.1").write_text("older\n")
    fresh = MetricsLogger(True, metrics_path=str(path), stream=io.StringIO())
    line = fresh.start(resumed=False)
    assert "moved them to" in line and str(tmp_path / "metrics.jsonl.2") in line
    fresh.log({"iteration": 1, "loss": 3.0})
    fresh.close()
    assert (tmp_path / "metrics.jsonl.1").read_text() == "older\n"
    assert json.loads((tmp_path / "metrics.jsonl.2").read_text())["iteration"] == 5
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [1]
    resumed = MetricsLogger(True, metrics_path=str(path), stream=io.StringIO())
    assert resumed.start(resumed=True) is None
    resumed.log({"iteration": 2, "loss": 2.0})
    resumed.close()
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [1, 2]
    assert rotate(str(tmp_path / "absent.jsonl")) is None


def _cfg(**train) -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.data.data_path = ["x"]
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 32, 4
    for k, v in train.items():
        section = "checkpoint" if k.startswith("save") else ("log" if "log" in k else "train")
        setattr(getattr(cfg, section), k, v)
    return cfg


@pytest.mark.parametrize("name,value", [
    ("exit_duration_in_mins", -1), ("exit_duration_in_mins", 0), ("exit_interval", 0),
    ("exit_interval", -5), ("eval_interval", 0), ("eval_iters", -1), ("log_interval", 0),
    ("max_skipped_iters", -1), ("clip_grad", -1.0), ("loss_scale_window", 0),
    ("save_interval", 0)])
def test_validate_rejects_meaningless_counts_naming_the_flag(name, value):
    cfg = _cfg(**{name: value})
    if name == "save_interval":
        cfg.checkpoint.save = "/tmp/guard-C-never"
    with pytest.raises(ConfigError, match="--" + name.replace("_", "-")):
        validate(cfg, 1, 1000)


def test_validate_accepts_positive_exit_duration():
    validate(_cfg(exit_duration_in_mins=0.5, exit_interval=3), 1, 1000)


def test_wandb_without_the_package_is_one_line_at_start(capsys):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    from megapre.cli.pretrain import main

    rc = main(["--data-path", "x", "--tokenizer-type", "NullTokenizer", "--vocab-size", "39",
               "--wandb-project", "p"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == ("megapre.pretrain: error: --wandb-project needs the wandb package: "
                      "pip install wandb (or drop --wandb-project)")


def test_banner_config_lines_golden():
    from megapre.data.tokenizers import build_tokenizer
    from megapre.train import banner

    cfg = PretrainConfig()
    cfg.data.data_path, cfg.data.tokenizer_type, cfg.data.vocab_size = ["x"], "NullTokenizer", 39
    m, p, t = cfg.model, cfg.parallel, cfg.train
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 4, 64, 4, 128
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = 2
    p.num_layers_per_virtual_pipeline_stage, p.pipeline_schedule = 1, "interleaved"
    t.micro_batch_size, t.global_batch_size, t.train_iters, t.bf16 = 2, 16, 100, True
    cfg.checkpoint.save, cfg.checkpoint.save_interval = "/ck", 50
    tok = build_tokenizer(cfg.tokenizer_config())
    lines = banner.config_lines(validate(cfg, 8, tok.vocab_size), 8, tok)
    assert lines == [
        "model       gpt, 4 layers, hidden 64, 4 heads, seq 128",
        "layout      world 8 = TP 2 x PP 2 x DP 2; VP 2; schedule interleaved-1f1b; "
        "global batch 16 = micro 2 x 4 micro-batches x DP 2",
        "training    100 iterations, 2,048 tokens per iteration, bf16 autocast",
        f"tokenizer   NullTokenizer, vocab 40, fingerprint {tok.fingerprint()[:12]}",
        "save        /ck (every 50 iterations and at the end)",
        "load        -",
        "metrics     - (console only; --metrics-path FILE keeps them)"]
    cfg.checkpoint.load = "/nonexistent/ckpt"
    assert banner.config_lines(validate(cfg, 8, tok.vocab_size), 8, tok)[5] == (
        "load        /nonexistent/ckpt (WARNING: no such directory; this run starts from scratch)")
    assert banner.model_lines(27_780, 1_234_567, "cpu", "fused") == [
        "parameters  27.78k total, 1.23M on this rank", "device      cpu, attention backend fused"]


def test_banner_data_lines_count_documents_tokens_and_epochs():
    import types

    import numpy as np

    from megapre.train import banner

    indexed = types.SimpleNamespace(document_indices=np.arange(11),
                                    sequence_lengths=np.full(10, 100))
    part = types.SimpleNamespace(indexed=indexed, document_range=(0, 8))
    blend = types.SimpleNamespace(datasets=[part, types.SimpleNamespace(indexed=indexed,
                                                                         document_range=(8, 10))])
    splits = types.SimpleNamespace(train=part, valid=blend, test=None)
    assert banner.data_lines(splits, tokens_per_run=2000) == [
        "train       8 documents, 800 tokens, 2.50 epochs over the run",
        "valid       10 documents, 1,000 tokens",
        "test        - (off)"]


@pytest.mark.slow
def test_second_fresh_run_rotates_metrics_and_prints_banner(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import write_counting_corpus

    root = Path(__file__).resolve().parents[2]
    corpus = write_counting_corpus(tmp_path / "count_text_document", docs=200)
    metrics = tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-m", "megapre.pretrain", "--num-layers", "1", "--hidden-size", "16",
           "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2",
           "--train-iters", "2", "--log-interval", "1", "--eval-interval", "2",
           "--eval-iters", "1", "--data-path", corpus, "--split", "90,5,5",
           "--tokenizer-type", "NullTokenizer", "--vocab-size", "39", "--num-workers", "0",
           "--device", "cpu", "--data-cache-path", str(tmp_path / "cache"),
           "--metrics-path", str(metrics)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    runs = [subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (r.stdout for r in runs)
    for key in ("model", "layout", "tokenizer", "save", "load", "metrics", "parameters",
                "device", "train", "valid", "test"):
        assert f"[megapre] {key:<12}" in first, key
    assert "moved" not in first
    assert f"moved them to {metrics}.1" in second
    old = [json.loads(x) for x in (tmp_path / "metrics.jsonl.1").read_text().splitlines()]
    new = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in old if "split" not in r] == [1, 2]
    assert [r["iteration"] for r in new if "split" not in r] == [1, 2]
    summary = json.loads((tmp_path / "metrics.summary.json").read_text())
    assert summary["exit_reason"] == "finished" and summary["iteration"] == 2
    assert "run summary:" in second and "[megapre] summary {" not in second


def test_missing_logging_package_is_checked_at_run_start_not_when_planning(monkeypatch):
    from megapre.train import args as train_args

    monkeypatch.setattr(train_args, "_missing", lambda module: True)
    cfg = _cfg()
    cfg.log.tensorboard_dir = "tb"
    validate(cfg, 1, 1000)  # the memory estimate and the sweep's planning validate too
    with pytest.raises(ConfigError, match=r"--tensorboard-dir needs the tensorboard package: "
                                          r"pip install tensorboard \(or drop --tensorboard-dir\)"):
        train_args.check_logging(cfg.log)


def test_config_banner_comes_before_torch_is_imported(tmp_path):
    """`import torch` alone takes seconds on a busy node: the config's banner lines (and every
    config error) must not wait for it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import write_counting_corpus

    root = Path(__file__).resolve().parents[2]
    corpus = write_counting_corpus(tmp_path / "count_text_document", docs=100)
    args = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "1",
            "--data-path", corpus, "--split", "90,5,5", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "39", "--num-workers", "0", "--device", "cpu",
            "--data-cache-path", str(tmp_path / "cache")]
    probe = f"""
import sys
import megapre.train.banner as banner
from megapre.cli import pretrain
seen = []
emit = banner.emit
def spy(lines):
    seen.append("torch" in sys.modules)
    emit(lines)
banner.emit = spy
code = pretrain.main({args!r})
print("TORCH_AT_FIRST_BANNER", seen[0], "BANNERS", len(seen), "EXIT", code)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH_AT_FIRST_BANNER False BANNERS 3 EXIT 0" in proc.stdout, proc.stdout[-2000:]
    assert "[megapre] model       gpt, 1 layers" in proc.stdout
