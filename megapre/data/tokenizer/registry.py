"""The tokenizer registry: Megatron's --tokenizer-type names -> backend classes, and build_tokenizer.

    tok = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", vocab_file=..., merge_file=...))
    tok.encode_batch(texts)   # fast path, no special tokens added; append tok.eod yourself

Megatron names: GPT2BPETokenizer, BertWordPieceLowerCase, BertWordPieceCase, SentencePieceTokenizer,
GPTSentencePieceTokenizer, HuggingFaceTokenizer, NullTokenizer. Ours: ByteLevelTokenizer,
CharacterTokenizer (vocabulary from tools/train_tokenizer.py --kind char).

This module sits above the backends (they import only base.py); `megapre.data.tokenizers`
re-exports it.
"""
from __future__ import annotations

import difflib
from dataclasses import replace
from functools import partial
from typing import Callable

from megapre.data.tokenizer.added import AddedTokensTokenizer
from megapre.data.tokenizer.base import TokenizerConfig, TokenizerError, Tokenizer
from megapre.data.tokenizer.gpt2 import GPT2BPETokenizer
from megapre.data.tokenizer.hf import BertWordPieceTokenizer, HuggingFaceTokenizer
from megapre.data.tokenizer.simple import ByteLevelTokenizer, CharacterTokenizer, NullTokenizer
from megapre.data.tokenizer.spm import GPTSentencePieceTokenizer, SentencePieceTokenizer

__all__ = ["TOKENIZER_TYPES", "TokenizerConfig", "Tokenizer", "TokenizerError", "build_tokenizer"]

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
    """The tokenizer `config` names (with its `added_tokens` appended where the vocabulary
    lacks them); errors name the flag or file at fault and the fix."""
    make = TOKENIZER_TYPES.get(config.tokenizer_type)
    if make is None:
        close = difflib.get_close_matches(str(config.tokenizer_type), TOKENIZER_TYPES, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TokenizerError(
            f"--tokenizer-type {config.tokenizer_type!r} is not supported{hint}; "
            f"valid types: {', '.join(TOKENIZER_TYPES)}"
        )
    if not config.added_tokens:
        return make(config)
    return AddedTokensTokenizer(make(replace(config, added_tokens=())), config.added_tokens)
