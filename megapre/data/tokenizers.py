"""The public tokenizer API (kept here so `from megapre.data.tokenizers import ...` works everywhere):
the registry and build_tokenizer (megapre.data.tokenizer.registry), the Tokenizer contract
(megapre.data.tokenizer.base), and Megatron's tokenizer flags for command-line tools.
"""
from __future__ import annotations

import argparse

from megapre.data.tokenizer.base import TokenizerConfig, TokenizerError, Tokenizer
from megapre.data.tokenizer.registry import TOKENIZER_TYPES, build_tokenizer
from megapre.data.tokenizer.simple import write_char_vocab

__all__ = [
    "TokenizerConfig",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "add_tokenizer_args",
    "tokenizer_config_from_args",
    "TOKENIZER_TYPES",
    "write_char_vocab",
]


def add_tokenizer_args(parser: argparse.ArgumentParser, required: bool = True) -> argparse._ArgumentGroup:
    """Megatron's tokenizer flags, so every megapre tool spells and documents them the same way."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=required, metavar="TYPE",
                       help=f"one of: {', '.join(TOKENIZER_TYPES)}")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json, BERT vocab.txt, or a character vocabulary JSON")
    group.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument("--tokenizer-model", help="SentencePiece .model, or tokenizer.json (file or directory)")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer: ids 0..N-1, eod = N")
    return group


def tokenizer_config_from_args(args: argparse.Namespace) -> TokenizerConfig:
    return TokenizerConfig(
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
    )
