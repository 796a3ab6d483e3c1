"""Counters, the throttled progress line, peak memory, and the atomically written stats file."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class Counters:
    documents: int = 0
    bytes: int = 0                          # input bytes (decompressed) of every batch read
    tokens: dict[str, int] = field(default_factory=dict)       # per key
    sequences: dict[str, int] = field(default_factory=dict)    # per key
    start: float = field(default_factory=time.perf_counter)

    def add(self, key: str, tokens: int, sequences: int) -> None:
        self.tokens[key] = self.tokens.get(key, 0) + tokens
        self.sequences[key] = self.sequences.get(key, 0) + sequences

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rates(self) -> str:
        dt = max(self.elapsed(), 1e-9)
        return (f"{self.documents:,} docs ({self.documents / dt:,.0f}/s), "
                f"{self.bytes / 1e6:,.1f} MB ({self.bytes / 1e6 / dt:,.2f} MB/s), "
                f"{self.total_tokens:,} tokens ({self.total_tokens / dt:,.0f}/s)")


class Progress:
    """Prints the rates to `stream` at most every `interval` seconds (0 disables): a rewritten
    line on a terminal, one line per update in a log file."""

    def __init__(self, counters: Counters, interval: float, stream: IO[str] | None = None,
                 label: str = "", total_bytes: int | None = None) -> None:
        stream = stream if stream is not None else sys.stderr   # the current one, not the import-time one
        self.counters, self.interval, self.stream, self.label = counters, interval, stream, label
        self.total_bytes = total_bytes          # known when every input is uncompressed text
        self._last = time.perf_counter()
        self._tty = hasattr(stream, "isatty") and stream.isatty()
        self._dirty = False

    def update(self, skipped: int = 0) -> None:
        now = time.perf_counter()
        if self.interval <= 0 or now - self._last < self.interval:
            return
        self._last = now
        line = f"{self.label}{self.counters.rates()}" + (f", {skipped:,} skipped" if skipped else "")
        line += self._eta()
        if self._tty:
            self.stream.write("\r\x1b[K" + line)
            self._dirty = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _eta(self) -> str:
        done, total = self.counters.bytes, self.total_bytes
        if not total or not done:
            return ""
        left = self.counters.elapsed() * (total - done) / done
        return f" [{100 * done / total:.0f}%, ETA {int(left // 60)}m{int(left % 60):02d}s]"

    def close(self) -> None:
        if self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of the largest finished child (workers), in MB
    (Linux reports ru_maxrss in KiB)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / (1024 * 1024)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return {"main": round(own, 1), "largest_worker": round(child, 1)}


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, fsync, and rename over it: readers see the
    old file or the complete new one, never a torn write."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
