"""One run per --save directory: a second run (a real second process) fails at start with one
line naming the owner; the lock goes away when the run ends, and a dead owner's lock is taken
over with a warning."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import COUNTING_VOCAB, write_counting_corpus
from megapre.run_lock import RunLockedError
from megapre.train.checkpoint_lock import LOCK_FILE, save_dir_lock

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
HOLD = ("import sys, time; from megapre.train.checkpoint_lock import save_dir_lock; "
        "save_dir_lock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")


def _pretrain(corpus: str, work: Path, save: Path, iters: int = 2) -> subprocess.Popen:
    args = ["--model", "gpt", "--num-layers", "1", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", str(iters), "--eval-iters", "0",
            "--log-interval", "1", "--data-path", corpus, "--split", "100,0,0",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(COUNTING_VOCAB - 1),
            "--make-vocab-size-divisible-by", "8", "--num-workers", "0", "--device", "cpu",
            "--data-cache-path", str(work / "cache"), "--save", str(save)]
    return subprocess.Popen([sys.executable, "-m", "megapre.pretrain", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_counting_corpus(str(tmp_path_factory.mktemp("corpus") / "count_text_document"))


def _holder(save: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(save)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_fails_naming_the_owner_then_takes_over_a_dead_lock(corpus, tmp_path):
    save = tmp_path / "ckpt"
    holder = _holder(save)
    try:
        out, err = _pretrain(corpus, tmp_path, save).communicate(timeout=300)
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1, err
        assert f"is in use by another run (pid {holder.pid} on host {socket.gethostname()}" \
            in lines[0] and str(save / LOCK_FILE) in lines[0], lines
        assert not any(p.name.startswith("iter_") for p in save.iterdir())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run = _pretrain(corpus, tmp_path, save)  # the holder died without releasing
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-2000:]
    assert f"took over the lock {save / LOCK_FILE} of a run that is gone (pid {holder.pid}" in out
    assert (save / "iter_0000002").is_dir() and not (save / LOCK_FILE).exists()


def test_lock_is_released_on_sigterm_exit(corpus, tmp_path):
    save = tmp_path / "ckpt"
    run = _pretrain(corpus, tmp_path, save, iters=100000)
    deadline = time.time() + 240
    while not (save / LOCK_FILE).exists() and time.time() < deadline:
        time.sleep(0.2)
    owner = json.loads((save / LOCK_FILE).read_text())
    assert owner["pid"] == run.pid and owner["host"] == socket.gethostname()
    time.sleep(3)  # into the training loop
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-2000:]
    assert not (save / LOCK_FILE).exists()


def test_lock_in_process(tmp_path):
    lock = save_dir_lock(tmp_path)
    assert lock.acquire() == []
    (tmp_path / LOCK_FILE).write_text(json.dumps({**json.loads((tmp_path / LOCK_FILE).read_text()),
                                                  "host": "elsewhere", "token": "theirs"}))
    with pytest.raises(RunLockedError, match=r"pid \d+ on host elsewhere.*delete "):
        save_dir_lock(tmp_path).acquire()
    lock.release()  # no longer ours (another token): release removes only its own lock
    assert (tmp_path / LOCK_FILE).exists()
