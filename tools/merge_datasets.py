#!/usr/bin/env python
"""Merge indexed datasets: `python tools/merge_datasets.py --input A B --output-prefix C`.
The front end is megapre/cli/merge_datasets.py (see its docstring, or --help)."""
import sys

from megapre.cli.merge_datasets import main

if __name__ == "__main__":
    sys.exit(main())
