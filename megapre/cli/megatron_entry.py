"""Megatron-LM's entry scripts under their own names: `torchrun ... pretrain_gpt.py FLAGS` and
`pretrain_bert.py FLAGS` (at the top of this repository, and as the console scripts
megapre-pretrain-gpt / megapre-pretrain-bert) run megapre.pretrain with the model chosen and the
tokenizer defaulted as Megatron's scripts do, so a Megatron launch script runs from the
repository's directory unchanged."""
from __future__ import annotations

import sys

from megapre.cli.pretrain import main

# Megatron's args_defaults of each script: used when no --tokenizer-type is given.
ENTRIES = {"gpt": ("pretrain_gpt.py", "GPT2BPETokenizer"),
           "bert": ("pretrain_bert.py", "BertWordPieceLowerCase")}


def run(model: str, argv: list[str] | None = None) -> int:
    """A later `--model` on the command line still wins (argparse keeps the last)."""
    script, tokenizer = ENTRIES[model]
    args = sys.argv[1:] if argv is None else argv
    return main(["--model", model, *args], {"data.tokenizer_type": tokenizer}, prog=script)


def gpt() -> int:
    return run("gpt")


def bert() -> int:
    return run("bert")
