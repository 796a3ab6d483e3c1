"""`python -m megapre.pretrain` / `torchrun ... -m megapre.pretrain`: the front end is
megapre/cli/pretrain.py (this module keeps the documented path working)."""
import sys

from megapre.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
