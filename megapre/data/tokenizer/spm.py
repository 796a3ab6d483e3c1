"""SentencePiece .model files, in Megatron's two flavours.

SentencePieceTokenizer (Megatron's BERT/T5 flavour) appends <CLS> <SEP> <EOD> <MASK> (and <PAD> when
the model has no pad piece) after the model's pieces, and treats those strings and the model's
pad/bos/eos pieces as special when they occur in text; eod is <EOD>. GPTSentencePieceTokenizer adds
nothing and uses the model's </s> as eod. Both give the ids Megatron gives.
"""
from __future__ import annotations

import re
from typing import Sequence

from .base import TokenizerConfig, TokenizerError, Tokenizer, reject_unused, require_file

try:
    import sentencepiece as spm
except ImportError:  # pragma: no cover - exercised only where the dependency is missing
    spm = None


def _load(config: TokenizerConfig):
    if spm is None:
        raise TokenizerError(f"{config.tokenizer_type} needs the `sentencepiece` package: pip install sentencepiece")
    reject_unused(config, ("tokenizer_model",))
    path = require_file(config, "tokenizer_model", "a SentencePiece .model file")
    try:
        proc = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"--tokenizer-model {path}: not a SentencePiece model ({e})") from e
    return path, proc


def _piece_or_none(proc, idx: int) -> str | None:
    return proc.id_to_piece(idx) if 0 <= idx < proc.get_piece_size() else None


class GPTSentencePieceTokenizer(Tokenizer):
    """The model's pieces only; eod = the model's eos (</s>), bos and pad as the model defines them."""

    def __init__(self, config: TokenizerConfig) -> None:
        path, self._sp = _load(config)
        super().__init__(config, {"tokenizer_model": path})
        self.vocab_size = self._sp.get_piece_size()
        for name, idx in (("eod", self._sp.eos_id()), ("bos", self._sp.bos_id()),
                          ("pad", self._sp.pad_id()), ("unk", self._sp.unk_id())):
            setattr(self, name, idx if 0 <= idx < self.vocab_size else None)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=1)  # workers are the parallelism

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._check_ids(ids))


class SentencePieceTokenizer(Tokenizer):
    """Megatron's SentencePieceTokenizer: the model's pieces + <CLS> <SEP> <EOD> <MASK> [<PAD>]."""

    ADDED = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")

    def __init__(self, config: TokenizerConfig) -> None:
        path, self._sp = _load(config)
        super().__init__(config, {"tokenizer_model": path})
        n = self._sp.get_piece_size()
        vocab = {self._sp.id_to_piece(i): i for i in range(n)}
        self._special: dict[str, int] = {}

        def special(token: str) -> int:
            if token not in vocab:
                vocab[token] = len(vocab)
            self._special[token] = vocab[token]
            return vocab[token]

        self.cls, self.sep, self.eod, self.mask = (special(t) for t in self.ADDED)
        self.pad = special(_piece_or_none(self._sp, self._sp.pad_id()) or "<PAD>")
        self.bos = special(_piece_or_none(self._sp, self._sp.bos_id()) or "<BOS>")
        self.eos = special(_piece_or_none(self._sp, self._sp.eos_id()) or "<EOS>")
        unk = self._sp.unk_id()
        self.unk = unk if 0 <= unk < n else None
        self.vocab_size = len(vocab)
        self._pieces = n
        self._id_to_special = {i: t for t, i in self._special.items()}
        # Longest first so "<SEP>" never loses to a shorter special that is its prefix.
        alternatives = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in alternatives))

    def encode(self, text: str) -> list[int]:
        if self._special_re.search(text) is None:
            return self._sp.encode(text, out_type=int)
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids += self._sp.encode(text[start:m.start()], out_type=int)
            ids.append(self._special[m.group()])
            start = m.end()
        ids += self._sp.encode(text[start:], out_type=int)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        texts = list(texts)
        plain = [i for i, t in enumerate(texts) if self._special_re.search(t) is None]
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain], out_type=int, num_threads=1)):
            out[i] = ids
        done = set(plain)
        for i, t in enumerate(texts):
            if i not in done:
                out[i] = self.encode(t)
        return out

    def special_tokens(self) -> dict[str, int]:
        """The strings read as one special id when they occur in text (for exports)."""
        return dict(self._special)

    def decode(self, ids: Sequence[int]) -> str:
        # As Megatron: each special token is written as " TOKEN " between the decoded pieces.
        ids = self._check_ids(ids)
        parts, last = [], 0
        for k, i in enumerate(ids):
            if i in self._id_to_special:
                parts.append(self._sp.decode(ids[last:k]) + " " + self._id_to_special[i] + " ")
                last = k + 1
        parts.append(self._sp.decode(ids[last:]))
        return "".join(parts)
