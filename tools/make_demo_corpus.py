#!/usr/bin/env python
"""Build the quickstart's demo corpus (see megapre/data/demo_corpus.py)."""
import sys

from megapre.cli.make_demo_corpus import main

if __name__ == "__main__":
    sys.exit(main())
