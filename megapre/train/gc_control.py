"""Megatron's --manual-gc: Python's automatic garbage collector off, collections at chosen
points instead. On many ranks an automatic collection pauses one rank at a random step and
every other rank waits for it at the next collective; collecting everywhere at the same
iteration turns those stragglers into one short, shared pause."""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


class ManualGC:
    def __init__(self, enabled: bool, interval: int, around_eval: bool) -> None:
        self.enabled, self.interval, self.around_eval = enabled, interval, around_eval
        self._was_enabled = gc.isenabled()
        if enabled:
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval > 0 and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        if self.enabled and self.around_eval:
            gc.collect()
        try:
            yield
        finally:
            if self.enabled and self.around_eval:
                gc.collect()

    def close(self) -> None:
        """Give the collector back its previous state (a later run in this process)."""
        if self.enabled and self._was_enabled:
            gc.enable()
