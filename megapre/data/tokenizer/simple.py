"""Tokenizers that need no library: raw UTF-8 bytes, characters (nanoGPT's shakespeare-char), and
Megatron's NullTokenizer for text that already holds token ids."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from .base import TokenizerConfig, TokenizerError, Tokenizer, read_text, reject_unused, require_file


class ByteLevelTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes; 256 is eod, 257 pad. Decoding bad UTF-8 yields U+FFFD."""

    EOD_TEXT = "<|endoftext|>"
    PAD_TEXT = "<|pad|>"

    def __init__(self, config: TokenizerConfig) -> None:
        reject_unused(config, ())
        super().__init__(config, {})
        self.vocab_size, self.eod, self.pad = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # lone surrogates survive json.loads but are not UTF-8
            raise ValueError(f"ByteLevelTokenizer: text is not encodable as UTF-8 ({e})") from None

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in self._check_ids(ids):
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self.EOD_TEXT if i == self.eod else self.PAD_TEXT)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


# ------------------------------------------------------------------------------------- characters
CHAR_VOCAB_FORMAT = "megapre-char-vocab"
CHAR_SPECIAL_TEXT = {"eod": "<|endoftext|>", "pad": "<|pad|>", "unk": "<|unk|>"}


def write_char_vocab(path: str | os.PathLike, chars: Iterable[str], specials: Sequence[str] = ()) -> Path:
    """Write a character vocabulary (sorted, as nanoGPT) atomically; specials get the ids after it."""
    unknown = [s for s in specials if s not in CHAR_SPECIAL_TEXT]
    if unknown:
        raise ValueError(f"unknown special tokens {unknown}; choose from {sorted(CHAR_SPECIAL_TEXT)}")
    data = {
        "format": CHAR_VOCAB_FORMAT,
        "version": 1,
        "chars": sorted(set(chars)),
        "special_tokens": [s for s in CHAR_SPECIAL_TEXT if s in specials],
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=0)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _load_char_vocab(path: Path) -> tuple[list[str], list[str]]:
    try:
        data = json.loads(read_text(path, "--vocab-file"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"--vocab-file {path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != CHAR_VOCAB_FORMAT:
        raise TokenizerError(
            f"--vocab-file {path}: not a character vocabulary (no \"format\": \"{CHAR_VOCAB_FORMAT}\"); "
            "create one with tools/train_tokenizer.py --kind char"
        )
    chars, specials = data.get("chars"), data.get("special_tokens", [])
    if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
        raise TokenizerError(f"--vocab-file {path}: \"chars\" must be a list of single characters")
    if len(set(chars)) != len(chars) or not chars:
        raise TokenizerError(f"--vocab-file {path}: \"chars\" is empty or has duplicates")
    if not isinstance(specials, list) or any(s not in CHAR_SPECIAL_TEXT for s in specials):
        raise TokenizerError(f"--vocab-file {path}: \"special_tokens\" must be a subset of {list(CHAR_SPECIAL_TEXT)}")
    return chars, specials


class CharacterTokenizer(Tokenizer):
    """One id per character of a vocabulary built from the corpus (tinyshakespeare: 65 characters).

    A character outside the vocabulary maps to unk if the vocabulary has one, else raises ValueError.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        reject_unused(config, ("vocab_file",))
        path = require_file(config, "vocab_file", "a character vocabulary JSON (tools/train_tokenizer.py --kind char)")
        super().__init__(config, {"vocab_file": path})
        chars, specials = _load_char_vocab(path)
        self._stoi = {c: i for i, c in enumerate(chars)}
        self._itos = list(chars) + [CHAR_SPECIAL_TEXT[s] for s in specials]
        for offset, special in enumerate(specials):
            setattr(self, special, len(chars) + offset)
        self.vocab_size = len(self._itos)

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            if self.unk is not None:
                unk = self.unk
                return [stoi.get(c, unk) for c in text]
            bad = next(c for c in text if c not in stoi)
            raise ValueError(
                f"CharacterTokenizer: character {bad!r} (U+{ord(bad):04X}, offset {text.index(bad)}) is not in "
                f"the vocabulary {self._files['vocab_file'][0]}; retrain it on this corpus or add an unk token "
                "(tools/train_tokenizer.py --kind char --char-specials unk)"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        itos = self._itos
        return "".join(itos[i] for i in self._check_ids(ids))


# ------------------------------------------------------------------------------------------- null
class NullTokenizer(Tokenizer):
    """Text of whitespace-separated ids. As Megatron, --vocab-size N gives ids 0..N-1, eod = N, and a
    vocabulary of N + 1 (so eod == vocab_size - 1)."""

    def __init__(self, config: TokenizerConfig) -> None:
        reject_unused(config, ("vocab_size",))
        size = config.vocab_size
        if size is None or isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise TokenizerError(
                f"NullTokenizer needs --vocab-size N > 0 (the number of ids before eod; got {size!r})"
            )
        super().__init__(config, {})
        self.vocab_size, self.eod = size + 1, size

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in text.split():
            try:
                ids.append(int(part))
            except ValueError:
                raise ValueError(f"NullTokenizer: {part[:40]!r} is not an integer token id") from None
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad_id = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"NullTokenizer: id {bad_id} is outside [0, {self.vocab_size}) (--vocab-size {self.eod})")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in self._check_ids(ids))
