"""One run per --save directory: two runs saving into one directory destroy each other (one's
pruning deletes the other's save in progress, the directory mixes two runs).

The lock itself is megapre.run_lock.RunLock on `<save>/.megapre-save.lock` (released at
interpreter exit too); this module adds only the collective step: the writer (global rank 0)
takes it, and every rank fails together when it could not.
"""
from __future__ import annotations

import os

from megapre.errors import ConfigError
from megapre.run_lock import RunLock, RunLockedError

LOCK_FILE = ".megapre-save.lock"


def save_dir_lock(save_dir: str | os.PathLike) -> RunLock:
    """The (not yet acquired) lock of a --save directory. A lock naming this very process is
    left from an earlier in-process run that did not release, so it is taken over."""
    return RunLock(os.path.join(save_dir, LOCK_FILE), "--save", save_dir,
                   "two runs saving into one directory destroy each other's checkpoints",
                   own_pid_is_stale=True)


def lock_save_dir(save_dir: str | os.PathLike, device) -> tuple[RunLock | None, list[str]]:
    """Collective: global rank 0 takes the lock, and every rank raises together when it could
    not (no rank is left waiting in a collective). Returns (the lock on rank 0, warnings)."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    writer = not distributed or dist.get_rank() == 0
    lock, error, notes = None, None, []
    if writer:
        try:
            lock = save_dir_lock(save_dir)
            notes = lock.acquire()
        except ConfigError as e:  # held by another run, or the lock file cannot be created
            error = e
    if distributed:
        flag = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and error is None:
            error = RunLockedError(f"--save {save_dir}: rank 0 could not lock it for this run "
                                   "(its message says why: in use by another run, or unwritable)")
    if error is not None:
        raise error
    return lock, notes
