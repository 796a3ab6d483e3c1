#!/usr/bin/env python
"""Tokenize a corpus into Megatron indexed datasets (.bin/.idx). Thin wrapper: the logic lives in
megapre.data.preprocess, the flags in megapre/cli/preprocess_data.py (--help lists flags and exit
codes)."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "megapre")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # a source checkout runs its own megapre, not an installed one

from megapre.cli.preprocess_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
