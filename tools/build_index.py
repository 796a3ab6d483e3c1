#!/usr/bin/env python
"""Build the GPT sample/shuffle/blend indices of a run offline; see megapre/cli/build_index.py."""
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "megapre" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))  # run from a source checkout: use this tree's megapre

from megapre.cli.build_index import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
