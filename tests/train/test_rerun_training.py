"""--rerun-mode through real training runs: re-runs change nothing when nothing is wrong (same
losses as without, dropout included), a NaN that reproduces is checkpointed before its update
and diagnosed after a restart elsewhere, and the exit codes and checkpoints under torchrun with
pipeline parallelism are Megatron's."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megapre.train.rerun as rerun
from conftest import tiny_gpt_flags, write_counting_corpus
from megapre.cli.flags import parse_config
from megapre.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_counting_corpus(str(tmp_path_factory.mktemp("corpus") / "count_text_document"))


def _args(corpus: str, work: Path, *extra: str) -> list[str]:
    return tiny_gpt_flags(corpus, work, *extra, train_iters=5, hidden_dropout=0.1,
                          attention_dropout=0.1)


def _losses(work: Path) -> list[float]:
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r and "loss" in r]


def _train(corpus: str, work: Path, *extra: str, poison=None) -> Trainer:
    """Train in this process; `poison(trainer, iteration)` may tamper before each step."""
    trainer = Trainer(parse_config(_args(corpus, work, *extra)))
    if poison is not None:
        step = trainer.step

        def poisoned(data):
            poison(trainer, trainer.state.iteration)
            return type(step).__call__(step, data)
        trainer.step = poisoned  # type: ignore[assignment]
        trainer.step.set_global_batch_size = step.set_global_batch_size  # type: ignore[attr-defined]
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


@pytest.mark.parametrize("mode", ["validate_results", "report_stats"])
def test_reruns_leave_a_healthy_run_unchanged(corpus, tmp_path, mode, capsys):
    plain, checked = tmp_path / "plain", tmp_path / "checked"
    _train(corpus, plain)
    _train(corpus, checked, "--rerun-mode", mode, "--check-for-spiky-loss",
           "--check-for-large-grads")
    assert _losses(checked) == _losses(plain)  # bit for bit, dropout masks included
    out = capsys.readouterr().out
    if mode == "report_stats":  # each re-run drew the same dropout: no difference at all
        lines = [x for x in out.splitlines() if "determinism at iteration" in x]
        assert len(lines) >= 5 and all("max 0 " in x or x.endswith("max 0") for x in lines), lines


def _poison_weights(trainer: Trainer, iteration: int) -> None:
    if iteration == 2:
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(math.nan)


def test_reproducible_nan_is_saved_before_its_update_and_diagnosed_elsewhere(
        corpus, tmp_path, monkeypatch, capsys):
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(rerun.RerunExit) as first:
        _train(corpus, tmp_path / "a", "--rerun-mode", "validate_results", "--save", ckpt,
               "--save-interval", "1", poison=_poison_weights)
    assert first.value.halt.exit_code == rerun.EXIT_RESUME_TO_DISAMBIGUATE
    meta = json.loads((Path(ckpt) / "iter_0000002" / "meta.json").read_text())
    saved = meta["extra"]["rerun"]["ranks"][0]
    assert saved["phase"] == rerun.Phase.WILL_RERUN_FROM_CHECKPOINT and saved["iteration"] == 3
    assert not (Path(ckpt) / "iter_0000003").exists()  # the step did not update anything
    out = capsys.readouterr().out
    assert "first re-run: the unexpected result reproduces" in out

    # the same node and device: asked to go elsewhere, the checkpoint stays as it was
    with pytest.raises(rerun.RerunExit) as again:
        _train(corpus, tmp_path / "b", "--rerun-mode", "validate_results", "--save", ckpt,
               "--load", ckpt)
    assert again.value.halt.exit_code == rerun.EXIT_RESUME_TO_DISAMBIGUATE
    assert json.loads((Path(ckpt) / "iter_0000002" / "meta.json").read_text()) == meta

    monkeypatch.setattr(rerun, "local_identity", lambda: ("elsewhere", 7))
    with pytest.raises(rerun.RerunExit) as last:
        _train(corpus, tmp_path / "c", "--rerun-mode", "validate_results", "--save", ckpt,
               "--load", ckpt)
    assert last.value.halt.exit_code == rerun.EXIT_FAILED_VALIDATION
    assert "correct result (but possible application error)" in capsys.readouterr().out


def test_a_device_fault_shows_as_a_persistent_error(corpus, tmp_path, monkeypatch, capsys):
    """A NaN that only the first machine computes: its re-run from the checkpoint on another
    machine gives a finite loss."""
    ckpt = str(tmp_path / "ckpt")
    faulty = {"on": True}

    def faulty_device(trainer: Trainer, iteration: int) -> None:
        if iteration == 2 and faulty["on"]:
            trainer.model.chunks[0].register_forward_hook(
                lambda mod, args, out: out * math.nan if faulty["on"] else out)

    with pytest.raises(rerun.RerunExit):
        _train(corpus, tmp_path / "a", "--rerun-mode", "validate_results", "--save", ckpt,
               poison=faulty_device)
    faulty["on"] = False
    monkeypatch.setattr(rerun, "local_identity", lambda: ("elsewhere", 0))
    with pytest.raises(rerun.RerunExit) as last:
        _train(corpus, tmp_path / "b", "--rerun-mode", "validate_results", "--save", ckpt,
               "--load", ckpt)
    assert last.value.halt.exit_code == rerun.EXIT_FAILED_VALIDATION
    assert "possible persistent error!" in capsys.readouterr().out


def test_without_save_a_reproducible_nan_exits_17(corpus, tmp_path):
    with pytest.raises(rerun.RerunExit) as e:
        _train(corpus, tmp_path, "--rerun-mode", "validate_results", poison=_poison_weights)
    assert e.value.halt.exit_code == rerun.EXIT_FAILED_VALIDATION
    assert "--save" in e.value.halt.message


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_torchrun_pp2_injected_faults_exit_with_megatron_codes(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "megapre.pretrain"]
    base = _args(corpus, tmp_path, "--pipeline-model-parallel-size", "2", "--rerun-mode",
                 "validate_results", "--error-injection-rate", "1", "--save", str(ckpt))
    transient = _run([*torchrun, *base, "--error-injection-type", "transient_error"], tmp_path)
    assert transient.returncode != 0
    assert "possible transient error!" in transient.stdout, transient.stdout[-3000:]
    assert "exit code 17" in transient.stdout

    persistent = _run([*torchrun, *base, "--error-injection-type", "persistent_error"], tmp_path)
    assert "exit code 16" in persistent.stdout, persistent.stdout[-3000:]
    saved = json.loads((ckpt / "iter_0000001" / "meta.json").read_text())["extra"]["rerun"]
    assert saved["layout"] == [2, 1, 2, 1, 1] and len(saved["ranks"]) == 2

    # resumed in another layout: the per-rank diagnosis cannot carry over; training goes on
    one = _run([sys.executable, "-m", "megapre.pretrain", *_args(
        corpus, tmp_path, "--rerun-mode", "validate_results", "--load", str(ckpt))], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "its rerun state is ignored" in one.stdout


def test_pretrain_cli_returns_the_halt_code(corpus, tmp_path):
    proc = _run([sys.executable, "-m", "megapre.pretrain", *_args(
        corpus, tmp_path, "--rerun-mode", "validate_results", "--error-injection-rate", "1",
        "--error-injection-type", "transient_error")], tmp_path)
    assert proc.returncode == rerun.EXIT_FAILED_VALIDATION, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_injection_needs_validate_results(corpus, tmp_path):
    proc = _run([sys.executable, "-m", "megapre.pretrain", *_args(
        corpus, tmp_path, "--error-injection-rate", "10")], tmp_path)
    assert proc.returncode == 2
    assert "--error-injection-rate 10" in proc.stderr and "--rerun-mode" in proc.stderr


@pytest.mark.slow
def test_torchrun_report_stats_with_the_distributed_optimizer(corpus, tmp_path):
    """DP2 with the sharded optimizer and both overlaps: re-runs leave the losses unchanged and
    rank 0 reports the gathered differences (zero on the CPU)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "megapre.pretrain"]
    extra = ("--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather")
    plain, checked = tmp_path / "plain", tmp_path / "checked"
    plain.mkdir(), checked.mkdir()
    p1 = _run([*torchrun, *_args(corpus, plain, *extra)], plain)
    p2 = _run([*torchrun, *_args(corpus, checked, *extra, "--rerun-mode", "report_stats")],
              checked)
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-3000:]
    assert _losses(checked) == _losses(plain)
    lines = [x for x in p2.stdout.splitlines() if "determinism at iteration" in x]
    assert len(lines) == 2 * 5, p2.stdout[-3000:]  # loss and grad norm, every logged step
    assert all(x.endswith("max 0") for x in lines), lines
