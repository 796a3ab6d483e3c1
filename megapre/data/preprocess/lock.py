"""One preprocessing run per output prefix: PREFIX.lock, created exclusively (O_EXCL) and holding
the owner's host and pid, for the life of the run. A second run on the prefix fails at once naming
the owner instead of both exiting 0 with one output lost. A lock whose owner is a dead process on
this host (a SIGKILLed run) is stale and taken over; one from another host is never guessed at.

Also here: removing the temporary files a killed run left beside its outputs
(`NAME.bin.tmp-PID-RAND`, `NAME.errors.jsonl.tmpPID`, ...), which only a dead pid's can be.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Callable


class PrefixLockedError(ValueError):
    """Another live run holds the prefix (a usage error: nothing was written)."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        return True
    return True


def _owner(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _stale(owner: dict) -> bool:
    """The owner is a dead process on this host (an unreadable lock is not guessed stale)."""
    pid = owner.get("pid")
    return (owner.get("host") == socket.gethostname() and isinstance(pid, int)
            and not pid_alive(pid))


class PrefixLock:
    """Context manager holding PREFIX.lock; `log` reports a stale lock taken over."""

    def __init__(self, prefix: str, log: Callable[[str], None] = lambda m: None) -> None:
        self.path = Path(f"{prefix}.lock")
        self.log = log
        self._held = False

    def __enter__(self) -> "PrefixLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise self._locked_error(_owner(self.path))

    def _take_over_if_stale(self) -> None:
        """Move a dead owner's lock aside (rename is atomic: of two runs taking it over at once,
        one renames it and the other finds it gone and retries the exclusive create)."""
        owner = _owner(self.path)
        if not _stale(owner):
            raise self._locked_error(owner)
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _owner(aside) != owner:           # a live run's fresh lock: put it back
            os.rename(aside, self.path)
            raise self._locked_error(_owner(self.path))
        aside.unlink(missing_ok=True)
        self.log(f"{self.path}: removed the stale lock of pid {owner['pid']} (no longer running)")

    def _locked_error(self, owner: dict) -> PrefixLockedError:
        since = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(owner["started"]))
                 if isinstance(owner.get("started"), (int, float)) else "")
        who = (f"pid {owner.get('pid')} on host {owner.get('host')}{since}" if owner
               else "an unknown process")
        return PrefixLockedError(
            f"--output-prefix is in use by another preprocessing run ({who}; lock file "
            f"{self.path}); wait for it to finish, or delete the lock file if that run is gone")

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


_TMP_PID = re.compile(r"\.tmp-?(\d+)(?:-[0-9a-f]+)?$")


def remove_stale_temporaries(prefixes: list[str], log: Callable[[str], None]) -> list[Path]:
    """Delete `P*.tmp-PID[-RAND]` / `P*.tmpPID` files beside the outputs P whose PID is not a
    running process (call while holding the prefix lock); returns what was removed."""
    removed = []
    for prefix in prefixes:
        directory, name = os.path.split(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            m = _TMP_PID.search(entry.name)
            if (entry.name.startswith(name + ".") and m and int(m.group(1)) != os.getpid()
                    and not pid_alive(int(m.group(1)))):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    if removed:
        log(f"removed {len(removed)} temporary file(s) left by killed runs: "
            f"{', '.join(p.name for p in removed[:4])}{' ...' if len(removed) > 4 else ''}")
    return removed
