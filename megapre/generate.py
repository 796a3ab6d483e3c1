"""`python -m megapre.generate` / `torchrun ... -m megapre.generate`: the front end is
megapre/cli/generate.py (this module keeps the documented path working)."""
import sys

from megapre.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
