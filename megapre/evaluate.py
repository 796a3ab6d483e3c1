"""`python -m megapre.evaluate` / `torchrun ... -m megapre.evaluate`: the front end is
megapre/cli/evaluate.py (this module keeps the documented path working)."""
import sys

from megapre.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
