"""One run at a time on a path a run writes (a --save directory, a preprocessing --output-prefix):
an exclusive lock file naming its owner, so a second run fails at once with one line saying who
holds it, instead of the two silently destroying each other's output.

The lock is a file created with O_CREAT|O_EXCL (and fsynced) holding the owner's host, pid, start
time and a random token; `release` removes it only if it still holds our token, and also runs at
interpreter exit (normal ends, exceptions, SIGTERM's save-and-exit). A lock whose owner is a dead
process on this host (a SIGKILLed run) is stale and taken over; one from another host cannot be
checked, and an unreadable one (being written, or garbage) is never guessed stale.

Like megapre/errors.py this sits at the bottom of the package: standard library and errors only.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from megapre.errors import ConfigError

_CREATE_TRIES = 3  # a takeover that loses a race retries the exclusive create
_SETTLE_TRIES, _SETTLE_S = 5, 0.02  # how long an unreadable lock may be "being written"


class RunLockedError(ConfigError):
    """Another run holds the lock (a usage error: this run wrote nothing)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@dataclass(frozen=True)
class Owner:
    """Who holds a lock; `started` and `token` may be missing from hand-written/older files."""
    host: str
    pid: int
    started: float | None = None
    token: str = ""

    def describe(self) -> str:
        if self.started is None:
            return f"pid {self.pid} on host {self.host}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}, since {when}"


def read_owner(path: Path) -> Owner | None:
    """The lock's owner; None when the file is missing or unreadable (being written, garbage)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        pid, started = data["pid"], data.get("started")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
        return Owner(str(data["host"]), pid,
                     float(started) if isinstance(started, (int, float)) else None,
                     str(data.get("token", "")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class RunLock:
    """The exclusive claim of one run on `path` (the lock file), guarding `flag` `value`.

    `why` says what two runs would break (it goes into the refusal). `own_pid_is_stale`: a lock
    naming this very process is left over from an earlier run in it that did not release
    (in-process tests of a front end), so it is taken over instead of refused.

    Stale takeover removes the dead owner's file and then retries the exclusive create, so the
    lock is only ever *acquired* by O_EXCL and exactly one of several racing runs holds it (the
    idea of the preprocessing lock, kept over the --save lock's "write a temporary, replace the
    lock, read our token back": there two runs can replace in turn, each reading back its own token
    before the other's replace, so both believe they hold the lock, and a replace can clobber a
    live run's fresh lock). Removing is the one step that must not touch a live lock: a racer may
    have taken over and created a fresh lock between our read and our removal, and the old
    "rename aside, put back if it was fresh" leaves a moment with no lock file in which a third run
    gets in. So removals are serialized by a short flock on `LOCK.takeover`, and each re-reads the
    lock under it and removes it only if it still holds the stale owner it judged. flock dies with
    its process, so this guard is never stale itself; it is deleted after use.
    """

    def __init__(self, path: str | os.PathLike, flag: str, value: str | os.PathLike, why: str,
                 own_pid_is_stale: bool = False) -> None:
        self.path = Path(path)
        self.flag, self.value, self.why = flag, str(value), why
        self.own_pid_is_stale = own_pid_is_stale
        self.owner = Owner(socket.gethostname(), os.getpid(), time.time(), secrets.token_hex(8))
        self.held = False
        self.notes: list[str] = []

    def acquire(self) -> list[str]:
        """Take the lock or raise RunLockedError naming the owner; returns warnings (a stale
        lock taken over)."""
        self._mkdir()
        notes: list[str] = []
        for _ in range(_CREATE_TRIES):
            if self._create():
                self.held = True
                atexit.register(self.release)
                return notes
            other = self._read_settled()
            if other is None and not os.path.lexists(self.path):
                continue  # released, or removed by a racer, since the create: try again
            if other is None or not self._stale(other):
                raise self.refusal(other)
            if self._remove_stale(other):
                notes.append(f"took over the lock {self.path} of a run that is gone "
                             f"({other.describe()}; a stale lock: that process no longer runs)")
        raise self.refusal(read_owner(self.path))

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        mine = read_owner(self.path)
        if mine is not None and mine.token == self.owner.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.notes = self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def refusal(self, other: Owner | None) -> RunLockedError:
        who = other.describe() if other is not None else "an unknown owner: unreadable lock file"
        return RunLockedError(
            f"{self.flag} {self.value} is in use by another run ({who}): {self.why}. Wait for it "
            f"to finish or give this run another {self.flag}, or, if that run is gone, delete "
            f"{self.path}")

    def _mkdir(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{self.flag} {self.value}: cannot create the directory "
                              f"{self.path.parent}: {e.strerror or e}") from e

    def _create(self) -> bool:
        """O_EXCL-create the lock holding our owner record (fsynced); False if it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise ConfigError(f"{self.flag} {self.value}: cannot create the lock file "
                              f"{self.path}: {e.strerror or e}") from e
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(self.owner), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read_settled(self) -> Owner | None:
        """The owner; an unreadable file is re-read for a moment, as a racer's fresh O_EXCL file
        is empty until it writes its record."""
        for _ in range(_SETTLE_TRIES):
            owner = read_owner(self.path)
            if owner is not None or not os.path.lexists(self.path):
                return owner
            time.sleep(_SETTLE_S)
        return None

    def _stale(self, other: Owner) -> bool:
        """Same host and the process is gone (or is this process, when so configured)."""
        if other.host != self.owner.host:
            return False
        if other.pid == os.getpid():
            return self.own_pid_is_stale and other.token != self.owner.token
        return not pid_alive(other.pid)

    def _remove_stale(self, stale: Owner) -> bool:
        """Delete the lock if it still holds `stale` (False: a racer already replaced it)."""
        with self._takeover_guard():
            if read_owner(self.path) != stale:
                return False
            self.path.unlink(missing_ok=True)
            return True

    @contextlib.contextmanager
    def _takeover_guard(self) -> Iterator[None]:
        """Hold an exclusive flock on `LOCK.takeover` (only for a read and an unlink), deleting
        it afterwards; the inode check retries when a previous holder deleted the file we
        opened before we got its flock."""
        guard = self.path.with_name(f"{self.path.name}.takeover")
        while True:
            try:
                fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as e:
                raise ConfigError(f"{self.flag} {self.value}: cannot create {guard} to take over "
                                  f"the stale lock {self.path}: {e.strerror or e}") from e
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.path.samestat(os.fstat(fd), os.stat(guard)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            guard.unlink(missing_ok=True)
            os.close(fd)
