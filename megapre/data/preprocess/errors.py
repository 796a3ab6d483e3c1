"""Skip accounting: every input record that does not become a document is counted by reason and
written, with its file and line, to an errors file, so bad input never passes silently.

Exit codes of the preprocess CLI live here too because they are decided by what was skipped.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

EXIT_OK = 0            # every record became a document
EXIT_FAILURE = 1       # the run stopped (I/O error, --on-error fail, a bug): no output was finalized
EXIT_USAGE = 2         # bad flags or inputs found before any work started
EXIT_SKIPPED = 3       # the run completed, but some records were skipped (see the errors file)

# Why a record was skipped. Order is the order the summary prints them in.
SKIP_REASONS = (
    "malformed_json",     # the line is not valid JSON
    "not_an_object",      # valid JSON, but not a {...} object
    "missing_key",        # a --json-keys key (Parquet: column) is absent
    "non_string_value",   # the key's value is not a string (number, null, list, ...)
    "invalid_utf8",       # the bytes are not UTF-8
    "empty_document",     # the text is empty / whitespace only / tokenizes to nothing
    "tokenizer_error",    # the tokenizer raised on this text (the message is kept)
    "blank_line",         # an empty line in a JSONL file (no record at all)
    "unreadable_file",    # reading stopped at this line (truncated/corrupt file): the rest is lost
)


@dataclass(frozen=True)
class Skip:
    """One skipped record. `line` is 1-based (Parquet: row number); 0 means the whole file."""

    file: str
    line: int
    reason: str
    detail: str = ""
    count: int = 1        # records covered (> 1 only for file-level skips such as a missing column)

    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.line > 0 else self.file

    def message(self) -> str:
        more = f" ({self.count} records)" if self.count > 1 else ""
        return f"{self.location()}: {self.reason}{more}: {self.detail}"


class InputError(RuntimeError):
    """Raised under --on-error fail at the first bad record; the message names file:line."""

    def __init__(self, skip: Skip) -> None:
        super().__init__(skip.message())
        self.skip = skip


class ErrorLog:
    """Counts skips by reason and streams them to `path` (JSON lines), written to a temporary name
    and renamed on `close()`; with no skips the file is not left behind (a stale one is removed),
    so the presence of PREFIX.errors.jsonl means something was skipped."""

    def __init__(self, path: str | os.PathLike, fail_fast: bool = False) -> None:
        self.path = Path(path)
        self.fail_fast = fail_fast
        self.counts: Counter[str] = Counter()
        self.first: list[Skip] = []          # a few, for the summary
        self._tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self._fh: IO[str] | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, skips: Iterable[Skip]) -> None:
        for skip in skips:
            if self.fail_fast:
                raise InputError(skip)
            if skip.reason not in SKIP_REASONS:
                raise ValueError(f"unknown skip reason {skip.reason!r}")
            self.counts[skip.reason] += skip.count
            if len(self.first) < 5:
                self.first.append(skip)
            if self._fh is None:
                self._tmp.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self._tmp, "w", encoding="utf-8")
            self._fh.write(json.dumps({"file": skip.file, "line": skip.line, "reason": skip.reason,
                                       "detail": skip.detail, "count": skip.count},
                                      ensure_ascii=False) + "\n")

    def by_reason(self) -> dict[str, int]:
        return {r: self.counts[r] for r in SKIP_REASONS if self.counts[r]}

    def close(self) -> None:
        """Publish the errors file (or remove a stale one when nothing was skipped)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            os.replace(self._tmp, self.path)
        elif self.path.exists():
            self.path.unlink()

    def abort(self) -> None:
        """Drop the temporary file: the run failed, nothing it wrote is published."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._tmp.unlink(missing_ok=True)
