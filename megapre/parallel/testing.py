"""Run a function on N local processes joined by torch.distributed (gloo on CPU), for tests.

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initializes the default
process group in each, calls `fn(rank, world_size, *args)` and returns the per-rank results in rank
order. A failure on any rank terminates the others and raises with that rank's traceback; a hang
is cut off after `timeout_s` and names the ranks that never answered. `fn` must be importable by
name (a module-level function), and results must be picklable (tensors are fine).

Processes come from a fork server that has already imported torch, so each rank starts in well
under a second instead of paying the torch import again (this machine is often a 2-core CI box).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

_CONTEXT: mp.context.BaseContext | None = None


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context() -> mp.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in mp.get_all_start_methods():
            _CONTEXT = mp.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(["torch", "torch.distributed"])
        else:
            _CONTEXT = mp.get_context("spawn")
    return _CONTEXT


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, backend: str | None,
            timeout_s: float, threads: int, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        if backend is not None:
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))
        queue.put((rank, True, _dumps(fn(rank, world_size, *args))))
    except BaseException:  # report everything, including SystemExit from a bad test
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
                    backend: str | None = "gloo", threads_per_rank: int = 1) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` processes; return results by rank.

    With `backend=None` the default process group is left to `fn`; the environment is set as
    torchrun sets it (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK).
    """
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, name=f"rank{r}", daemon=True,
                         args=(fn, r, world_size, port, backend, timeout_s, threads_per_rank,
                               args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, queue, world_size, timeout_s, getattr(fn, "__name__", str(fn)))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)


def _collect(procs, queue, world_size: int, timeout_s: float, name: str) -> list[Any]:
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < world_size:
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(set(range(world_size)) - set(results))
            raise TimeoutError(f"{name}: ranks {missing} of {world_size} did not finish within "
                               f"{timeout_s:.0f} s (deadlock in a collective, or too slow)")
        try:
            rank, ok, payload = queue.get(timeout=min(left, 1.0))
        except Exception:  # queue.Empty: check for ranks that died without reporting
            dead = [r for r, p in enumerate(procs) if r not in results and not p.is_alive()
                    and p.exitcode not in (0, None)]
            if dead:
                codes = {r: procs[r].exitcode for r in dead}
                raise RuntimeError(f"{name}: rank(s) {dead} died without a result "
                                   f"(exit codes {codes})") from None
            continue
        if not ok:
            raise RuntimeError(f"{name}: rank {rank} of {world_size} failed:\n{payload}")
        results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return [results[r] for r in range(world_size)]
