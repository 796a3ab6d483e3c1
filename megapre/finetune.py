"""`python -m megapre.finetune` / `torchrun ... -m megapre.finetune`: the front end is
megapre/cli/finetune.py."""
import sys

from megapre.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
