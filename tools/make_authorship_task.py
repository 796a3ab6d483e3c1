#!/usr/bin/env python
"""Build the authorship task from a book corpus and its manifest (see megapre/data/authorship.py)."""
import sys

from megapre.cli.make_authorship_task import main

if __name__ == "__main__":
    sys.exit(main())
