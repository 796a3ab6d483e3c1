"""The public tokenizer API (kept here so `from megapre.data.tokenizers import ...` works everywhere):
the registry and build_tokenizer (megapre.data.tokenizer.registry), the Tokenizer contract
(megapre.data.tokenizer.base). The tokenizer flags of the command-line tools are declared in
megapre/cli/flags.py.
"""
from __future__ import annotations

from megapre.data.tokenizer.base import TokenizerConfig, TokenizerError, Tokenizer
from megapre.data.tokenizer.registry import TOKENIZER_TYPES, build_tokenizer
from megapre.data.tokenizer.simple import write_char_vocab

__all__ = [
    "TokenizerConfig",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "TOKENIZER_TYPES",
    "write_char_vocab",
]
