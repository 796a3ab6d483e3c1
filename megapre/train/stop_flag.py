"""A clean stop on request: SIGTERM (the scheduler's warning) or Ctrl-C asks a training loop
(pretraining, fine-tuning) to finish its step, save and exit."""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Any


class StopFlag:
    """SIGTERM (the scheduler's warning) or a first Ctrl-C (SIGINT) asks for a checkpoint and a
    clean exit at the end of the current step. A repeated signal (torchrun forwards the one its
    process group already got) changes nothing, except a second Ctrl-C pressed more than
    `ESCALATE_S` after the first, which interrupts at once (KeyboardInterrupt)."""

    ESCALATE_S = 2.0

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal received, 0 while none
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return self.signum != 0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (tests): no handler
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """The handlers from before the run: a process that goes on after the trainer (a
        notebook, a test session) must stop on SIGTERM again."""
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            return
        if signum == signal.SIGINT and now - self._first_at > self.ESCALATE_S:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt


def agreed_stop(signum: int, duration_expired: bool, interval_hit: bool, device) -> str | None:
    """The reason every rank stops now (max over ranks, so no rank leaves a collective behind):
    the received signal's name, "exit-duration-in-mins" or "exit-interval"; None to go on."""
    import torch
    import torch.distributed as dist

    vec = torch.tensor([float(signum), float(duration_expired), float(interval_hit)],
                       device=device)
    if dist.is_initialized():
        dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    got = vec.tolist()
    if got[0] > 0:  # the signal's number (max over ranks): name it
        return signal.Signals(int(got[0])).name
    for name, v in zip(("exit-duration-in-mins", "exit-interval"), got[1:]):
        if v > 0:
            return name
    return None
