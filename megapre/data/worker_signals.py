"""Stop signals in DataLoader workers.

A scheduler's SIGTERM (Slurm, `timeout`, `kill -TERM -- -PGID`) and Ctrl-C's SIGINT reach every
process of the job, workers included. A worker that died of it would take the run down before the
main process could finish its step and save ("DataLoader worker ... is killed by signal"), so
workers ignore SIGINT and every SIGTERM but one: their parent's. The main process stops workers
with SIGTERM when they do not leave on request (torch's shutdown fallback, multiprocessing's exit
handler); ignoring that one too would leave the main process waiting for them forever.

The sender of a signal is only known from `sigwaitinfo`, so SIGTERM is blocked in the worker (its
threads inherit the mask) and a small thread waits for it: from the parent, the worker exits at
once with status 0 (the parent asked for it; torch treats a worker's non-zero exit while its
iterator lives as a crash); from anyone else, it is dropped.
"""
from __future__ import annotations

import os
import signal
import threading

STOPPED_BY_PARENT = 0


def _wait_for_parent_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(STOPPED_BY_PARENT)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGINT ignored, SIGTERM honoured only from the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_wait_for_parent_sigterm, args=(os.getppid(),),
                     name="sigterm-from-parent", daemon=True).start()
