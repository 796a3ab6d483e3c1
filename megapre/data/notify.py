"""Warnings and progress lines of the data layer, on stderr and from one process only (global rank
0 under torchrun), so a data problem is said once, not once per rank."""
from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def warn(message: str) -> None:
    """One 'warning: ...' line on stderr (rank 0 only)."""
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    """One line on stderr (rank 0 only)."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)
