"""megapre.run_lock.RunLock, the one lock behind --save and --output-prefix: a second run is
refused naming the owner, a dead owner's lock is taken over, release removes only our own file,
and of several runs taking over one stale lock at once exactly one wins."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megapre.errors import ConfigError
from megapre.run_lock import RunLock, RunLockedError, read_owner

ROOT = Path(__file__).resolve().parents[2]
WHY = "two runs would clash"
RACER = """
import os, sys, time
from megapre.run_lock import RunLock, RunLockedError
lock = RunLock(sys.argv[1], "--save", "d", "why")
while not os.path.exists(sys.argv[2]):
    time.sleep(0.0005)
try:
    lock.acquire()
    print("won", flush=True)
except RunLockedError:
    print("refused", flush=True)
sys.stdin.read()  # hold the lock until the test has seen every answer
"""


def _lock(path: Path, **kw) -> RunLock:
    return RunLock(path, "--save", path.parent, WHY, **kw)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_stale(path: Path, pid: int | None = None) -> int:
    pid = pid or dead_pid()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                "started": time.time() - 60, "token": "dead"}))
    return pid


def test_second_acquire_is_refused_naming_the_owner_and_what_to_delete(tmp_path):
    path = tmp_path / "run.lock"
    first = _lock(path)
    assert first.acquire() == [] and first.held
    assert json.loads(path.read_text())["token"] == first.owner.token
    with pytest.raises(RunLockedError) as e:
        _lock(path).acquire()
    msg = str(e.value)
    assert isinstance(e.value, ConfigError)
    assert msg.startswith(f"--save {tmp_path} is in use by another run (pid {os.getpid()} on "
                          f"host {socket.gethostname()}, since ")
    assert WHY in msg and msg.endswith(f"if that run is gone, delete {path}")
    first.release()
    assert not path.exists()
    with _lock(path) as again:  # released: free to take, also as a context manager
        assert again.held and path.exists()
    assert not path.exists()


def test_lock_of_another_host_or_unreadable_is_never_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": dead_pid()}))
    with pytest.raises(RunLockedError, match=r"on host elsewhere\)"):
        _lock(path).acquire()
    path.write_text("{not json")
    with pytest.raises(RunLockedError, match="unknown owner: unreadable lock file"):
        _lock(path).acquire()
    assert path.read_text() == "{not json"


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    pid = write_stale(path)
    lock = _lock(path)
    notes = lock.acquire()
    assert len(notes) == 1 and f"took over the lock {path} of a run that is gone (pid {pid} " \
        in notes[0] and "stale lock" in notes[0]
    assert read_owner(path) == lock.owner
    assert [p.name for p in tmp_path.iterdir()] == ["run.lock"]  # nothing left aside
    lock.release()


def test_own_pid_lock_is_refused_unless_configured_stale(tmp_path):
    path = tmp_path / "run.lock"
    earlier = _lock(path)
    earlier.acquire()  # an earlier in-process run that never released
    with pytest.raises(RunLockedError):
        _lock(path).acquire()
    assert len(_lock(path, own_pid_is_stale=True).acquire()) == 1


def test_release_removes_only_our_own_file(tmp_path):
    path = tmp_path / "run.lock"
    lock = _lock(path)
    lock.acquire()
    path.write_text(json.dumps({**json.loads(path.read_text()), "token": "theirs"}))
    lock.release()
    assert path.exists() and not lock.held
    path.unlink()
    lock.release()  # idempotent, and nothing to remove
    other = _lock(path)
    other.acquire()
    lock.release()  # a released lock never touches the next holder's file
    assert read_owner(path) == other.owner
    other.release()
    assert not path.exists()


def test_unwritable_directory_is_one_config_error_naming_the_flag(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^--save .*: cannot create the directory"):
        _lock(tmp_path / "file" / "sub" / "run.lock").acquire()


def test_concurrent_takeovers_of_a_stale_lock_exactly_one_process_wins(tmp_path):
    path, go = tmp_path / "run.lock", tmp_path / "go"
    write_stale(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(path), str(go)], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    try:
        time.sleep(1.0)  # let every racer import and reach its wait loop
        go.write_text("")
        answers = [r.stdout.readline().strip() for r in racers]
        assert sorted(answers) == ["refused"] * 3 + ["won"], answers
        winner = racers[answers.index("won")]
        assert read_owner(path).pid == winner.pid
        assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "run.lock"]
    finally:
        for r in racers:
            r.stdin.close()
            r.wait(timeout=60)


def test_concurrent_takeovers_of_a_stale_lock_exactly_one_thread_wins(tmp_path):
    path, pid = tmp_path / "run.lock", dead_pid()
    for _ in range(50):
        write_stale(path, pid)
        locks = [_lock(path) for _ in range(4)]
        barrier, won, errors = threading.Barrier(len(locks)), [], []

        def attempt(lock: RunLock) -> None:
            barrier.wait()
            try:
                lock.acquire()
                won.append(lock)
            except RunLockedError:
                pass
            except Exception as e:  # noqa: BLE001 - any other failure is a bug in the race
                errors.append(e)

        threads = [threading.Thread(target=attempt, args=(lock,)) for lock in locks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(won) == 1, (errors, won)
        assert read_owner(path) == won[0].owner
        won[0].release()
        assert list(tmp_path.iterdir()) == []
