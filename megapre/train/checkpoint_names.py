"""The names inside a checkpoint directory, torch-free so that the start-up banner can tell
whether `--load` holds a checkpoint before torch is imported (megapre/train/checkpoint.py
reads and writes them)."""
from __future__ import annotations

import os
import re

LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE, CONFIG_FILE, RNG_DIR, DCP_METADATA = "meta.json", "config.json", "rng", ".metadata"
ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """Cheap look (names only): a --save directory with a latest file or iter_* directories, or
    one iteration's directory. `checkpoint.find_latest` is the full check."""
    if not os.path.isdir(path):
        return False
    return any(name in (LATEST_FILE, META_FILE) or ITER_DIR.match(name)
               for name in os.listdir(path))
