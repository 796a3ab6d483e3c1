"""One run per --save directory: two runs saving into one directory destroy each other (one's
pruning deletes the other's save in progress, the directory mixes two runs).

The writer (global rank 0) creates `<save>/.megapre-save.lock` with O_CREAT|O_EXCL, holding its
owner (host, pid, start time, a random token), and removes it when the run ends (`release`:
called at interpreter exit, so normal ends, exceptions and the SIGTERM save-and-exit all release
it). A lock left by a dead process on this host is taken over with a warning; one from another
host cannot be checked, so the error says who holds it and how to remove it.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megapre.errors import ConfigError

LOCK_FILE = ".megapre-save.lock"


class SaveDirLockedError(ConfigError):
    """Another run holds the --save directory."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: float
    token: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}, since {when}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _read_owner(path: Path) -> Owner | None:
    """The lock's owner; None when the file is unreadable (being written, or garbage)."""
    try:
        data = json.loads(path.read_text())
        return Owner(str(data["host"]), int(data["pid"]), float(data["started"]),
                     str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class SaveDirLock:
    """The exclusive claim of one run on a --save directory."""

    def __init__(self, save_dir: str | os.PathLike) -> None:
        self.path = Path(save_dir) / LOCK_FILE
        self.owner = Owner(socket.gethostname(), os.getpid(), time.time(), secrets.token_hex(8))
        self.held = False

    def acquire(self) -> list[str]:
        """Take the lock or raise SaveDirLockedError naming the owner; returns warnings (a
        stale lock taken over)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            self._hold()
            return []
        other = _read_owner(self.path)
        if other is None or not self._stale(other):
            raise SaveDirLockedError(self._refusal(other))
        self._take_over()
        self._hold()
        return [f"took over the lock {self.path} of a run that is gone "
                               f"({other.describe()})"]

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        mine = _read_owner(self.path)
        if mine is not None and mine.token == self.owner.token:
            self.path.unlink(missing_ok=True)

    def _hold(self) -> None:
        self.held = True
        atexit.register(self.release)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise SaveDirLockedError(f"--save {self.path.parent}: cannot create the lock file "
                                     f"{self.path}: {os.strerror(e.errno or errno.EIO)}") from e
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.owner), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _stale(self, other: Owner) -> bool:
        """Same host and the process is gone (or is this very process, from an earlier run in
        it that did not release)."""
        return other.host == self.owner.host and (other.pid == os.getpid() or
                                                   not _pid_alive(other.pid))

    def _take_over(self) -> None:
        """Replace the stale file atomically; if another run took it over at the same moment,
        only one of the two finds its own token afterwards."""
        tmp = self.path.with_name(f"{LOCK_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self.owner)))
        tmp.replace(self.path)
        now = _read_owner(self.path)
        if now is None or now.token != self.owner.token:
            raise SaveDirLockedError(self._refusal(now))

    def _refusal(self, other: Owner | None) -> str:
        who = other.describe() if other is not None else "an unknown owner (unreadable file)"
        return (f"--save {self.path.parent} is in use by another run ({who}): two runs saving "
                f"into one directory destroy each other's checkpoints. Give this run another "
                f"--save, or, if that run is gone, delete {self.path}")


def lock_save_dir(save_dir: str | os.PathLike, device) -> tuple[SaveDirLock | None, list[str]]:
    """Collective: global rank 0 takes the lock, and every rank raises together when it could
    not (no rank is left waiting in a collective). Returns (the lock on rank 0, warnings)."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    writer = not distributed or dist.get_rank() == 0
    lock, error, notes = None, None, []
    if writer:
        try:
            lock = SaveDirLock(save_dir)
            notes = lock.acquire()
        except SaveDirLockedError as e:
            error = e
    if distributed:
        flag = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and error is None:
            error = SaveDirLockedError(f"--save {save_dir} is in use by another run (rank 0 "
                                       "names it)")
    if error is not None:
        raise error
    return lock, notes
