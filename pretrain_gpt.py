"""Megatron-LM's `pretrain_gpt.py` for megapre: `torchrun --nproc-per-node N pretrain_gpt.py FLAGS`
runs megapre.pretrain with --model gpt (see megapre/cli/megatron_entry.py)."""
import sys

from megapre.cli.megatron_entry import run

if __name__ == "__main__":
    sys.exit(run("gpt"))
