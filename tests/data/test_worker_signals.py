"""DataLoader workers outlive a stop signal sent to the whole job (the main process must finish
its step and save) but still stop when their own parent terminates them (otherwise the main
process would wait for them forever at shutdown)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import torch

from megapre.data.worker_signals import STOPPED_BY_PARENT, ignore_stop_signals


class _Pids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, i: int) -> int:
        return os.getpid()


def _worker_pid(loader_iter) -> int:
    return int(next(loader_iter))


def _wait_dead(worker, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not worker.is_alive():
            return True
        time.sleep(0.05)
    return False


def test_worker_ignores_others_sigterm_and_sigint_but_obeys_its_parent():
    loader = torch.utils.data.DataLoader(_Pids(), batch_size=None, num_workers=1,
                                         worker_init_fn=ignore_stop_signals)
    it = iter(loader)
    try:
        pid = _worker_pid(it)
        worker = it._workers[0]
        # from another process (what `kill -TERM -- -PGID`, Slurm or torchrun do): ignored
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
        subprocess.run(["kill", "-INT", str(pid)], check=True)
        time.sleep(1.0)
        assert worker.is_alive()
        assert _worker_pid(it) == pid          # and it still serves batches
        # from its parent (torch's shutdown fallback, multiprocessing's exit handler): it stops
        worker.terminate()
        assert _wait_dead(worker), "the worker ignored its parent's SIGTERM"
        assert worker.exitcode == STOPPED_BY_PARENT
    finally:
        it._shutdown_workers()


def test_group_sigterm_reaches_the_parent_not_the_worker_s_death(tmp_path):
    """The signal the whole process group gets: the parent (here a child python that installs
    a handler, as the trainer does) keeps reading batches from the same worker afterwards."""
    script = tmp_path / "group.py"
    script.write_text(f"""
import os, signal, sys, time
sys.path.insert(0, {str(tmp_path)!r})
import torch
from megapre.data.worker_signals import ignore_stop_signals
class P(torch.utils.data.Dataset):
    def __len__(self): return 10**6
    def __getitem__(self, i): return os.getpid()
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
it = iter(torch.utils.data.DataLoader(P(), batch_size=None, num_workers=1,
                                      worker_init_fn=ignore_stop_signals))
first = int(next(it))
print("READY", flush=True)
while not got:
    time.sleep(0.05)
time.sleep(0.5)
print("AFTER", int(next(it)) == first, flush=True)
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(__import__("pathlib").Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(["python", str(script)], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "READY"
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "AFTER True" in out, out
