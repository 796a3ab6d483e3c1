"""The contract every tokenizer backend meets, and the checks they share.

A tokenizer is fully defined by its `TokenizerConfig` plus the bytes of the files it names, so a
tokenizer pickles as (config, file digests) and rebuilds itself in a worker process; a worker whose
files changed since the parent loaded them refuses to start rather than emit different ids.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megapre.data.errors import DataError


@dataclass
class TokenizerConfig:
    """What `--tokenizer-type` and friends say (Megatron's flag names, one field each)."""

    tokenizer_type: str
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None  # SentencePiece .model, HF tokenizer.json (file or directory)
    vocab_size: int | None = None  # NullTokenizer
    # Tokens appended to the vocabulary where it lacks them (FIM sentinels, see added.py); not a
    # flag of its own: --fim-data fills it, so every program that rebuilds the run's tokenizer
    # from its config (resume, generate, evaluate) gets the same vocabulary.
    added_tokens: tuple[str, ...] = ()


class TokenizerError(DataError):
    """Bad tokenizer flags or files; the message names the flag or file and how to fix it."""


FLAGS = {
    "tokenizer_type": "--tokenizer-type",
    "vocab_file": "--vocab-file",
    "merge_file": "--merge-file",
    "tokenizer_model": "--tokenizer-model",
    "vocab_size": "--vocab-size",
}
SPECIAL_NAMES = ("eod", "pad", "cls", "sep", "mask", "bos", "unk")


def require_file(config: TokenizerConfig, field: str, what: str) -> Path:
    """The file named by `field`, checked to exist and be readable (errors say which flag to fix)."""
    flag, value = FLAGS[field], getattr(config, field)
    if value is None or str(value) == "":
        raise TokenizerError(f"{config.tokenizer_type} needs {flag}: pass the path of {what}")
    path = Path(os.fspath(value)).expanduser()
    if not path.exists():
        raise TokenizerError(f"{flag} {value}: no such file; pass the path of {what}")
    if path.is_dir():
        raise TokenizerError(f"{flag} {value} is a directory; pass the path of {what} itself")
    if not os.access(path, os.R_OK):
        raise TokenizerError(f"{flag} {value}: file is not readable (check its permissions)")
    return path


def reject_unused(config: TokenizerConfig, used: Sequence[str]) -> None:
    """A flag the tokenizer would ignore is a mistake in the command line: say so."""
    for field in ("vocab_file", "merge_file", "tokenizer_model", "vocab_size"):
        if field not in used and getattr(config, field) is not None:
            needs = ", ".join(FLAGS[f] for f in used) or "no files"
            raise TokenizerError(
                f"{config.tokenizer_type} does not use {FLAGS[field]} (got {getattr(config, field)!r}); "
                f"remove it ({config.tokenizer_type} takes {needs})"
            )


def read_text(path: Path, flag: str) -> str:
    """A vocabulary file as UTF-8 text; a binary or mis-encoded file is named in the error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{flag} {path}: not UTF-8 text ({e}); is it the right file?") from e
    except OSError as e:
        raise TokenizerError(f"{flag} {path}: cannot read ({e})") from e


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Tokenizer(abc.ABC):
    """Text <-> token ids, plus the special ids the datasets need (None where a tokenizer has none)."""

    config: TokenizerConfig
    name: str
    vocab_size: int
    eod: int | None = None
    pad: int | None = None
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None
    bos: int | None = None
    unk: int | None = None

    def __init__(self, config: TokenizerConfig, files: dict[str, Path]) -> None:
        self.config = config
        self.name = config.tokenizer_type
        # Hashed once, when loaded: describe() and the pickle check then refer to what was read.
        self._files = {key: (Path(p).resolve(), file_sha256(p), os.path.getsize(p)) for key, p in files.items()}

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with no special tokens added (no BOS, no EOD)."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text; backends with a native batch path override this."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ids outside the vocabulary raise ValueError."""

    def continuation_mask(self) -> np.ndarray:
        """bool[vocab_size]: True where a token continues a word (WordPiece "##x")."""
        return np.zeros(self.vocab_size, dtype=bool)

    def special_ids(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in SPECIAL_NAMES}

    def file_digests(self) -> dict[str, str]:
        return {key: digest for key, (_, digest, _) in self._files.items()}

    def fingerprint(self) -> str:
        """sha256 over what determines the ids (type, sizes, special ids, file contents) and not
        where the files are: the same tokenizer copied to another node has the same fingerprint."""
        key = {"type": self.name, "vocab_size": self.vocab_size, "special_ids": self.special_ids(),
               "files": self.file_digests(), "vocab_size_flag": self.config.vocab_size}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """Everything that determines the ids: goes into dataset stats and cache keys."""
        return {
            "type": self.name,
            "fingerprint": self.fingerprint(),
            "class": type(self).__name__,
            "vocab_size": self.vocab_size,
            "special_ids": self.special_ids(),
            "files": {
                key: {"path": str(path), "sha256": digest, "bytes": size}
                for key, (path, digest, size) in self._files.items()
            },
            "config": {k: v for k, v in asdict(self.config).items() if k != "added_tokens"},
        }

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        """ids as Python ints, all inside [0, vocab_size) (backends would otherwise skip or crash)."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(f"{self.name}: id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return arr.tolist()

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Constructor arguments beside the config (a backend whose __init__ takes more overrides it)."""
        return {}

    def __reduce__(self):
        # Absolute paths: a worker may run in another directory. Rebuilt by class, not through the
        # registry, so this contract module never imports the registry that sits above it.
        paths = {
            field: os.path.abspath(os.path.expanduser(os.fspath(value)))
            for field in ("vocab_file", "merge_file", "tokenizer_model")
            if (value := getattr(self.config, field)) is not None
        }
        return (_rebuild, (type(self), replace(self.config, **paths), self.rebuild_kwargs(), self.file_digests()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(type={self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _rebuild(cls: type[Tokenizer], config: TokenizerConfig, kwargs: dict[str, Any],
             digests: dict[str, str]) -> Tokenizer:
    tok = cls(config, **kwargs)
    now = tok.file_digests()
    for key, digest in digests.items():
        if now.get(key) != digest:
            raise TokenizerError(
                f"{FLAGS.get(key, key)} {tok._files[key][0]} changed since the tokenizer was pickled "
                f"(sha256 {digest[:12]} -> {str(now.get(key))[:12]}); ids would differ between processes"
            )
    return tok
