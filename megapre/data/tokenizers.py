"""One tokenizer interface over every backend, chosen by Megatron's --tokenizer-type names.

    tok = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", vocab_file=..., merge_file=...))
    tok.encode_batch(texts)   # fast path, no special tokens added; append tok.eod yourself

Megatron names: GPT2BPETokenizer, BertWordPieceLowerCase, BertWordPieceCase, SentencePieceTokenizer,
GPTSentencePieceTokenizer, HuggingFaceTokenizer, NullTokenizer. Ours: ByteLevelTokenizer,
CharacterTokenizer (vocabulary from tools/train_tokenizer.py --kind char).
"""
from __future__ import annotations

import argparse
import difflib
from functools import partial
from typing import Callable

from megapre.data.tokenizer.base import TokenizerConfig, TokenizerError, Tokenizer
from megapre.data.tokenizer.gpt2 import GPT2BPETokenizer
from megapre.data.tokenizer.hf import BertWordPieceTokenizer, HuggingFaceTokenizer
from megapre.data.tokenizer.simple import (
    ByteLevelTokenizer,
    CharacterTokenizer,
    NullTokenizer,
    write_char_vocab,
)
from megapre.data.tokenizer.spm import GPTSentencePieceTokenizer, SentencePieceTokenizer

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

TOKENIZER_TYPES: dict[str, Callable[[TokenizerConfig], Tokenizer]] = {
    "GPT2BPETokenizer": GPT2BPETokenizer,
    "BertWordPieceLowerCase": partial(BertWordPieceTokenizer, lower_case=True),
    "BertWordPieceCase": partial(BertWordPieceTokenizer, lower_case=False),
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "NullTokenizer": NullTokenizer,
    "ByteLevelTokenizer": ByteLevelTokenizer,
    "CharacterTokenizer": CharacterTokenizer,
}


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """The tokenizer `config` names; errors name the flag or file at fault and the fix."""
    make = TOKENIZER_TYPES.get(config.tokenizer_type)
    if make is None:
        close = difflib.get_close_matches(str(config.tokenizer_type), TOKENIZER_TYPES, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TokenizerError(
            f"--tokenizer-type {config.tokenizer_type!r} is not supported{hint}; "
            f"valid types: {', '.join(TOKENIZER_TYPES)}"
        )
    return make(config)


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
