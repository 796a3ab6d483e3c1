"""Megatron's tokenizer flags for the tools that take them without a whole pretraining config
(preprocessing, dataset inspection). Kept apart from flags.py so these tools start without
importing the training stack."""
from __future__ import annotations

import argparse

from megapre.data.tokenizers import TOKENIZER_TYPES, TokenizerConfig


def add_tokenizer_flags(parser: argparse.ArgumentParser, required: bool = True
                        ) -> argparse._ArgumentGroup:
    """Megatron's tokenizer flags, so every megapre tool spells and documents them the same way
    (megapre.pretrain takes the same names from its data section)."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=required, metavar="TYPE",
                       help=f"one of: {', '.join(TOKENIZER_TYPES)}")
    group.add_argument("--vocab-file",
                       help="GPT-2 vocab.json, BERT vocab.txt, or a character vocabulary JSON")
    group.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument("--tokenizer-model",
                       help="SentencePiece .model, or tokenizer.json (file or directory)")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer: ids 0..N-1, eod = N")
    return group


def tokenizer_config_from_args(args: argparse.Namespace) -> TokenizerConfig:
    return TokenizerConfig(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                           merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
                           vocab_size=args.vocab_size)
