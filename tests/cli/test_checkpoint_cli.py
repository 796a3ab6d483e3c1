"""Checkpoints through the real program: `python -m megapre.pretrain` and `torchrun`.

* SIGTERM mid-run: the program saves, exits 0, and `--load` continues with exactly the losses of an
  uninterrupted run.
* `torchrun --max-restarts 1` (TP2): one worker is SIGKILLed after a checkpoint exists; the agent
  restarts the workers, which resume from the latest checkpoint, and the job exits 0 with the
  losses of the uninterrupted single-process run (1e-5 relative: the layouts' contract).
* Two torchrun agents as two "nodes" (--nnodes 2, c10d rendezvous; TP2 inside a node, DP2
  across): one worker is SIGKILLed after a checkpoint exists (the job dies, as under a
  preempting scheduler); the relaunched job resumes likewise.

Dropout is off here: the Trainer draws from the global torch generator after loading (CPU peak
measurement, DataLoader iterator seeds), which an RNG restore cannot undo; the layout tests
(tests/train/test_checkpoint_layouts.py) prove bit-exact resume with dropout on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_counting_corpus
from megapre.parallel.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
VOCAB, ITERS = 40, 12
# The SIGTERM run is longer so the signal always lands mid-training, even on a fast machine (a
# signal that arrives after training, while the interpreter shuts down, kills with -15).
SIGTERM_ITERS = 60
DROPOUT = "0.1"  # same-layout resume: the restored RNG must replay the masks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_counting_corpus(tmp_path_factory.mktemp("corpus") / "count_text_document")


def _args(corpus: str, out: Path, *extra: str, dropout: str = DROPOUT) -> list[str]:
    return ["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr", "3e-3",
            "--lr-warmup-iters", "3", "--min-lr", "3e-4", "--hidden-dropout", dropout,
            "--attention-dropout", dropout, "--eval-interval", "1000", "--eval-iters", "0",
            "--log-interval", "1", "--data-path", corpus, "--split", "90,5,5",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
            "--make-vocab-size-divisible-by", "8", "--num-workers", "0", "--device", "cpu",
            "--data-cache-path", str(out.parent / "cache"),
            "--metrics-path", str(out / "metrics.jsonl"), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _losses(out: Path) -> dict[int, float]:
    """Loss by iteration; a re-run iteration (after a resume) keeps its last value."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows if "split" not in r}


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 300.0,
              poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _latest(save: Path) -> int:
    f = save / "latest_checkpointed_iteration.txt"
    return int(f.read_text()) if f.is_file() else 0


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[int, float]:
    return _straight_run(corpus, tmp_path_factory.mktemp("straight"), DROPOUT, SIGTERM_ITERS)


@pytest.fixture(scope="module")
def reference_no_dropout(corpus, tmp_path_factory) -> dict[int, float]:
    """Across layouts only dropout-free runs agree (TP ranks draw their own masks)."""
    return _straight_run(corpus, tmp_path_factory.mktemp("straight0"), "0")


def _straight_run(corpus: str, out: Path, dropout: str, iters: int = ITERS) -> dict[int, float]:
    proc = subprocess.run([sys.executable, "-m", "megapre.pretrain",
                           *_args(corpus, out, "--train-iters", str(iters), dropout=dropout)],
                          cwd=out, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(out)
    assert sorted(losses) == list(range(1, iters + 1))
    return losses


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_exactly(corpus, reference, tmp_path):
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "megapre.pretrain",
           *_args(corpus, tmp_path, "--save", str(save), "--load", str(save),
                  "--train-iters", str(SIGTERM_ITERS))]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc,
              "iteration 3", poll=0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = _latest(save)
    assert 3 <= stopped < SIGTERM_ITERS, (stopped, out[-2000:])
    assert (save / f"iter_{stopped:07d}" / "config.json").is_file()

    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at iteration {stopped}" in proc.stdout, proc.stdout[-2000:]
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, SIGTERM_ITERS + 1))
    assert losses == reference  # bit-identical, before and after the resume
    assert _latest(save) == SIGTERM_ITERS


def _workers(agent: int) -> list[int]:
    """The training processes torchrun started (its children running megapre.pretrain)."""
    kids = []
    for task in Path(f"/proc/{agent}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [k for k in kids
            if b"megapre.pretrain" in Path(f"/proc/{k}/cmdline").read_bytes()]


@pytest.mark.slow
def test_max_restarts_restarts_killed_worker_and_resumes(corpus, reference_no_dropout, tmp_path):
    """torchrun's own fault tolerance: a SIGKILLed worker makes the agent restart the group
    (TORCHELASTIC_RESTART_COUNT=1), the new workers load the latest checkpoint, and the job
    finishes with exit 0 and the losses of the uninterrupted run."""
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "megapre.pretrain",
           *_args(corpus, tmp_path, "--tensor-model-parallel-size", "2", "--save", str(save),
                  "--load", str(save), "--save-interval", "3", dropout="0")]
    agent = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _latest(save) >= 3, agent, "the first checkpoint", poll=0.02)
    workers = _workers(agent.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    out, err = agent.communicate(timeout=600)
    assert agent.returncode == 0, err[-4000:]
    resumed = [int(line.rsplit("at iteration", 1)[1].split()[0].strip(" ,.:"))
               for line in out.splitlines() if "at iteration" in line and "load" in line.lower()]
    assert resumed and 3 <= resumed[-1] < ITERS, out[-3000:]
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, ITERS + 1))
    for it, ref in reference_no_dropout.items():
        assert abs(losses[it] - ref) <= 1e-5 * abs(ref), (it, losses[it], ref)
    assert _latest(save) == ITERS


def _two_nodes(corpus: str, out: Path, *extra: str) -> list[subprocess.Popen]:
    """Two torchrun agents on this host acting as two nodes (the Slurm example's launch line):
    2 processes each, TP2 inside a node, DP2 across the nodes."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
               str(node), "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--rdzv-id", f"job{port}", "-m", "megapre.pretrain",
               *_args(corpus, out, "--tensor-model-parallel-size", "2", *extra, dropout="0")]
        procs.append(subprocess.Popen(cmd, cwd=out, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_two_node_job_killed_and_relaunched_resumes(corpus, reference_no_dropout, tmp_path):
    """A worker of the second node is SIGKILLed once a checkpoint exists (the job dies, as under a
    preempting scheduler); launching the same two agents again resumes from the latest
    checkpoint and finishes with the single process's losses."""
    save = tmp_path / "ckpt"
    flags = ("--save", str(save), "--load", str(save), "--save-interval", "3", "--keep-last", "2")
    first = _two_nodes(corpus, tmp_path, *flags)
    _wait_for(lambda: _latest(save) >= 3, first[1], "the first checkpoint", poll=0.02)
    workers = _workers(first[1].pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    for proc in first:
        proc.communicate(timeout=300)
    assert first[1].returncode != 0
    resumed_from = _latest(save)
    assert 3 <= resumed_from < ITERS

    second = _two_nodes(corpus, tmp_path, *flags)
    outs = [proc.communicate(timeout=600) for proc in second]
    for proc, (out, err) in zip(second, outs):
        assert proc.returncode == 0, err[-4000:]
    assert f"at iteration {resumed_from}" in outs[0][0], outs[0][0][-3000:]
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, ITERS + 1))
    for it, ref in reference_no_dropout.items():
        assert abs(losses[it] - ref) <= 1e-5 * abs(ref), (it, losses[it], ref)
    assert _latest(save) == ITERS
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000009", "iter_0000012"]
