#!/usr/bin/env python
"""Merge indexed datasets: `python tools/merge_datasets.py --input A B --output-prefix C`.
The logic lives in megapre.data.merge (see its docstring, or --help)."""
import sys

from megapre.data.merge import main

if __name__ == "__main__":
    sys.exit(main())
