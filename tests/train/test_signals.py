"""A stop signal sent to the whole process group (Slurm, `timeout`, Kubernetes, Ctrl-C) saves a
checkpoint and exits 0: the DataLoader workers ignore it and leave the stop to the main process,
which finishes the step, saves and shuts them down. Without --save it says nothing was saved."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import write_counting_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_counting_corpus(tmp_path_factory.mktemp("corpus") / "count_text_document", docs=400)


def _flags(corpus: str, out: Path, *extra: str) -> list[str]:
    return ["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "1000000", "--lr", "1e-3",
            "--eval-interval", "1000000", "--eval-iters", "1", "--log-interval", "2",
            "--data-path", corpus, "--split", "98,1,1", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "39", "--make-vocab-size-divisible-by", "8", "--num-workers", "2",
            "--device", "cpu", "--data-cache-path", str(out / "cache"), *extra]


def _signal_group_after_first_log(cmd: list[str], cwd: Path, sig: int) -> tuple[int, str, str]:
    """Start `cmd` in its own process group, send `sig` to the group (`kill -SIG -- -PGID`) once
    it logged a training line, and return (exit code, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    out: list[str] = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        out.append(line)
        if line.lstrip().startswith("iteration") or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, sig)
    out.extend(proc.stdout)
    rc = proc.wait(timeout=120)
    reader.join(timeout=10)
    return rc, "".join(out), "".join(err)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_group_signal_saves_and_exits_0(corpus, tmp_path, sig):
    save = tmp_path / "ckpt"
    rc, out, err = _signal_group_after_first_log(
        [sys.executable, "-m", "megapre.pretrain", *_flags(corpus, tmp_path, "--save", str(save))],
        tmp_path, sig)
    assert rc == 0, err[-3000:]
    assert "killed by signal" not in err
    assert "stopping at iteration" in out and signal.Signals(sig).name in out
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 2 and (save / f"iter_{latest:07d}").is_dir()
    assert f"saved checkpoint at iteration {latest}" in out


@pytest.mark.slow
def test_group_sigterm_without_save_says_nothing_was_saved(corpus, tmp_path):
    rc, out, err = _signal_group_after_first_log(
        [sys.executable, "-m", "megapre.pretrain", *_flags(corpus, tmp_path)], tmp_path,
        signal.SIGTERM)
    assert rc == 0, err[-3000:]
    assert "SIGTERM: no --save directory was given, so nothing was saved" in out


@pytest.mark.slow
def test_torchrun_group_sigterm_saves(corpus, tmp_path):
    """Under torchrun both the agent and its workers get the group's SIGTERM (and the agent
    forwards it): every rank finishes its step, the checkpoint is complete."""
    save = tmp_path / "ckpt"
    _signal_group_after_first_log(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "megapre.pretrain", *_flags(corpus, tmp_path, "--save", str(save))], tmp_path,
        signal.SIGTERM)
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 2 and (save / f"iter_{latest:07d}").is_dir()


def test_repeated_signals_only_escalate_on_a_later_ctrl_c():
    """torchrun forwards the SIGTERM (or SIGINT) its group already got: the copy must not
    interrupt the save. A second Ctrl-C pressed later does interrupt."""
    from megapre.train.loop import _StopFlag

    stop = _StopFlag()
    stop._handle(signal.SIGTERM, None)
    for _ in range(3):
        stop._handle(signal.SIGTERM, None)
        stop._handle(signal.SIGINT, None)  # within ESCALATE_S of the first
    assert stop.raised and stop.signum == signal.SIGTERM
    stop._first_at -= stop.ESCALATE_S + 1
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_close_restores_the_signal_handlers_of_before_the_run(tmp_path):
    """After the trainer, the process stops on SIGTERM again (a notebook, a test session)."""
    import signal as sig

    from megapre.train.loop import _StopFlag

    before = sig.getsignal(sig.SIGTERM), sig.getsignal(sig.SIGINT)
    stop = _StopFlag()
    stop.install()
    assert sig.getsignal(sig.SIGTERM) == stop._handle
    stop.restore()
    assert (sig.getsignal(sig.SIGTERM), sig.getsignal(sig.SIGINT)) == before
