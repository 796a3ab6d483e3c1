"""A tokenizer with tokens appended to its vocabulary (ids vocab_size, vocab_size + 1, ...).

Fill-in-the-middle training needs sentinel tokens (<fim_prefix>, ...) that GPT-2's vocabulary
lacks. Megatron gets them from its tokenizer (`--special-tokens`; without them its GPT-2 maps every
sentinel to <|endoftext|>); megapre appends the missing ones here, so the model's (padded)
vocabulary grows by them and the checkpoint's tokenizer record names them. The sentinels are
never produced by `encode`: text spelling "<fim_prefix>" is tokenized as text, as GPT-2 treats
"<|endoftext|>", so document text can never forge a sentinel; only the FIM dataset emits them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from .base import SPECIAL_NAMES, Tokenizer


def single_token_id(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of the one vocabulary token spelled `text` (a special token such as the EOD, or a
    token text encodes to alone), or None when `text` is not one token of this vocabulary."""
    for name in SPECIAL_NAMES:
        idx = getattr(tokenizer, name)
        if idx is not None and _decodes_to(tokenizer, idx, text):
            return idx
    try:
        ids = tokenizer.encode(text)
    except ValueError:  # a tokenizer whose text is ids (NullTokenizer) cannot spell it
        return None
    if len(ids) == 1 and _decodes_to(tokenizer, ids[0], text):
        return ids[0]
    return None


def _decodes_to(tokenizer: Tokenizer, idx: int, text: str) -> bool:
    try:
        return tokenizer.decode([idx]) == text
    except ValueError:
        return False


class AddedTokensTokenizer(Tokenizer):
    """`base` plus the tokens of `names` its vocabulary lacks, appended in order. Everything
    else (special ids, files, encode) is the base's; the fingerprint covers the added tokens, so
    a checkpoint trained with them refuses a tokenizer without them."""

    def __init__(self, base: Tokenizer, names: Sequence[str]) -> None:
        self.base = base
        self.names = tuple(names)
        existing = {n: single_token_id(base, n) for n in dict.fromkeys(self.names)}
        missing = [n for n, idx in existing.items() if idx is None]
        self.added = {n: base.vocab_size + i for i, n in enumerate(missing)}
        self.token_ids = {n: existing[n] if existing[n] is not None else self.added[n]
                          for n in existing}
        self.config = replace(base.config, added_tokens=self.names)
        self.name = base.name
        self.vocab_size = base.vocab_size + len(self.added)
        for special in SPECIAL_NAMES:
            setattr(self, special, getattr(base, special))
        self._files = base._files
        self._text = {idx: n for n, idx in self.added.items()}

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.base.encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """Runs of base ids decoded by the base (so multi-token characters join), the added
        tokens spelled out between them."""
        out: list[str] = []
        run: list[int] = []
        for idx in self._check_ids(ids):
            if idx in self._text:
                out += [self.base.decode(run)] if run else []
                out.append(self._text[idx])
                run = []
            else:
                run.append(idx)
        out += [self.base.decode(run)] if run else []
        return "".join(out)

    def continuation_mask(self) -> np.ndarray:
        return np.concatenate([self.base.continuation_mask(), np.zeros(len(self.added), bool)])

    def fingerprint(self) -> str:
        """The base's when nothing was appended (the ids are the base's), else over both."""
        if not self.added:
            return self.base.fingerprint()
        key = {"base": self.base.fingerprint(), "added_tokens": self.added}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return self.base.describe() | {"fingerprint": self.fingerprint(),
                                       "vocab_size": self.vocab_size,
                                       "base_vocab_size": self.base.vocab_size,
                                       "added_tokens": dict(self.added),
                                       "config": {**self.base.describe()["config"],
                                                  "added_tokens": list(self.names)}}

    def __reduce__(self):
        return (AddedTokensTokenizer, (self.base, self.names))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r}, added={self.added})"
