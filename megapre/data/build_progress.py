"""Progress of a long index build (GPT sample/shuffle indices, BERT mappings, blends), for
tools/build_index.py and the start of training alike: a background thread prints, at most every
`interval` seconds and only once a build has taken that long, what is being built, the time spent,
and an ETA once the build has reported how far it got (`advance(done, total)` in any unit)."""
from __future__ import annotations

import threading
import time
from typing import Callable

from megapre.data.notify import info


def _seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


class BuildProgress:
    """Context manager around one build; `advance(done, total, what)` from the building code."""

    def __init__(self, label: str, interval: float = 2.0,
                 emit: Callable[[str], None] = info) -> None:
        self.label, self.interval, self.emit = label, interval, emit
        self._done, self._total, self._what = 0, 0, ""
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._printed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="index-progress")

    def __enter__(self) -> "BuildProgress":
        if self.interval > 0:
            self._thread.start()
        return self

    def advance(self, done: int, total: int, what: str = "") -> None:
        self._done, self._total, self._what = done, total, what

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        text = f"[index] building {self.label}: {_seconds(elapsed)}"
        if self._what:
            text += f", {self._what}"
        if self._total and self._done:
            left = elapsed * (self._total - self._done) / self._done
            text += f" [{100 * self._done / self._total:.0f}%, ETA {_seconds(left)}]"
        return text

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit(self.line())
            self._printed = True

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._printed:
            self.emit(f"[index] built {self.label} in {_seconds(time.perf_counter() - self._start)}")
