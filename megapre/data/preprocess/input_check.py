"""Has an input changed since a finished run? Paths and sizes are not enough (an edit that keeps
the size was reused as "already finished"). Each input's stats entry records size, mtime and a
hash of its first and last MiB (cheap at any size) beside the sha256 of the whole file.

Default check: a different size or head/tail hash means changed; the same mtime as well means
unchanged; a different mtime (touched, copied, or edited in the middle) is settled by the full
sha256. `verify` (--verify-inputs) always compares the full sha256.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

from megapre.data.preprocess.readers import sha256_file

EDGE_BYTES = 1 << 20


def head_tail_sha256(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


def signature(path: str) -> dict[str, Any]:
    """What the stats file records of an input, taken before it is read."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_tail_sha256": head_tail_sha256(path, st.st_size)}


def change_reason(path: str, old: Mapping[str, Any], verify: bool) -> str | None:
    """Why `path` differs from its recorded entry `old` (None: the same content)."""
    now = signature(path)
    if old.get("size") != now["size"]:
        return f"size {old.get('size')} -> {now['size']} bytes"
    if old.get("head_tail_sha256") not in (None, now["head_tail_sha256"]):
        return "its first/last MiB changed"
    if not verify and old.get("mtime_ns") == now["mtime_ns"] and old.get("head_tail_sha256"):
        return None
    if old.get("sha256") != sha256_file(path):
        return "its sha256 changed" + ("" if verify else " (mtime changed too)")
    return None


def changed_inputs(paths: list[str], recorded: list[Mapping[str, Any]],
                   verify: bool) -> list[str]:
    """'PATH: reason' for every input whose content differs from the finished run's record."""
    by_path = {str(e.get("path")): e for e in recorded if isinstance(e, Mapping)}
    out = []
    for path in paths:
        reason = change_reason(path, by_path.get(path, {}), verify)
        if reason is not None:
            out.append(f"{path}: {reason}")
    return out
