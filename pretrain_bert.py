"""Megatron-LM's `pretrain_bert.py` for megapre: `torchrun --nproc-per-node N pretrain_bert.py FLAGS`
runs megapre.pretrain with --model bert (see megapre/cli/megatron_entry.py)."""
import sys

from megapre.cli.megatron_entry import run

if __name__ == "__main__":
    sys.exit(run("bert"))
