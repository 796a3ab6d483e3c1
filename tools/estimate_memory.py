#!/usr/bin/env python
"""Parameters, per-rank memory and FLOPs of a pretraining config before launch (see
megapre/cli/estimate_memory.py): the flags of megapre.pretrain plus --world-size N."""
import sys

from megapre.cli.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
