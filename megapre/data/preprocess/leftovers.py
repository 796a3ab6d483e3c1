"""Removing the temporary files a killed preprocessing run left beside its outputs
(`NAME.bin.tmp-PID-RAND`, `NAME.errors.jsonl.tmpPID`, ...): only a dead pid's can be, so they are
deleted while holding the prefix lock (megapre.run_lock) before a run starts writing."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from megapre.run_lock import pid_alive

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
