"""The tokenizer a checkpoint was trained with must be the one that feeds it: another vocabulary
(even two swapped lines of a vocab file) changes every id silently. Checkpoints record the
tokenizer's describe() (with its fingerprint: type, sizes, special ids and file contents, not
paths); resume, megapre.generate and megapre.evaluate compare it at start."""
from __future__ import annotations

from typing import Any

from megapre.errors import ConfigError

OVERRIDE_FLAG = "--allow-tokenizer-mismatch"


class TokenizerMismatchError(ConfigError):
    """The tokenizer differs from the checkpoint's."""


def _summary(described: dict[str, Any]) -> str:
    files = ", ".join(f"{k}={v.get('path')}" for k, v in (described.get("files") or {}).items())
    return f"{described.get('type')} {described.get('fingerprint', '?')[:16]}" + \
        (f" ({files})" if files else "")


def check_tokenizer(saved: dict | None, tokenizer, allow: bool, where: str) -> str | None:
    """Raise TokenizerMismatchError when `tokenizer` is not the one `saved` describes (unless
    `allow`); returns a warning to print (no record in an older checkpoint, or an allowed
    mismatch), else None."""
    if not saved or not saved.get("fingerprint"):
        return (f"checkpoint {where} records no tokenizer fingerprint (saved by an older "
                "megapre); cannot check that this tokenizer is the one it was trained with")
    now = tokenizer.describe()
    if now["fingerprint"] == saved["fingerprint"]:
        return None
    text = (f"the tokenizer differs from the one checkpoint {where} was trained with: "
            f"checkpoint {_summary(saved)} vs now {_summary(now)}")
    if allow:
        return f"{text}; continuing ({OVERRIDE_FLAG})"
    raise TokenizerMismatchError(f"{text}; every token id would mean something else. Give the "
                                 f"checkpoint's tokenizer files, or pass {OVERRIDE_FLAG} if the "
                                 "change is intended")
