#!/usr/bin/env python
"""Train a SentencePiece, byte-level BPE or character tokenizer on a corpus. Thin wrapper; the logic
lives in megapre.data.train_tokenizer, the flags in megapre/cli/train_tokenizer.py (--help)."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "megapre")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # a source checkout runs its own megapre, not an installed one

from megapre.cli.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
