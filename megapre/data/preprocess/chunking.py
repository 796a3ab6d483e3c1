"""Long documents are tokenized in bounded pieces: Hugging Face `tokenizers` keeps an encoding
object per token (~130 bytes of memory per input character), so one 50 MB record would take
~6.5 GB in a worker. A document longer than `max_chars` is cut into pieces of at most that length
and its ids are the pieces' ids concatenated, so peak memory follows the piece, not the record.

Where to cut: just before a space that starts a word (" word"). Every supported tokenizer splits
there: GPT-2's pre-tokenizer makes " word" one piece whatever precedes it (a run of whitespace
before it ends at the cut too: `\\s+(?!\\S)` at the end of a piece gives the same token), WordPiece
and the whitespace-separated NullTokenizer drop the space, byte/character tokenizers cut anywhere,
SentencePiece starts a piece at a space. So the ids equal whole-document tokenization. A stretch of
`max_chars` with no such space (a base64 blob) is cut hard at `max_chars`: memory stays bounded and
only the ids at that cut may differ.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

MAX_CHARS = 1 << 18     # characters per piece: ~35 MB of encodings in a worker


def _cut(text: str, start: int, max_chars: int) -> int:
    """End of the piece that starts at `start` (the whole rest when it fits)."""
    limit = start + max_chars
    if limit >= len(text):
        return len(text)
    pos = text.rfind(" ", start + 1, limit + 1)
    while pos > start:
        if pos + 1 < len(text) and not text[pos + 1].isspace():
            return pos
        pos = text.rfind(" ", start + 1, pos)
    return limit


def pieces(text: str, max_chars: int = MAX_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most max_chars, cut before a word-starting space."""
    start = 0
    while start < len(text):
        end = _cut(text, start, max_chars)
        yield text[start:end]
        start = end


def encode_long(encode_one: Callable[[str], list[int]], text: str,
                max_chars: int = MAX_CHARS) -> np.ndarray:
    """Ids of a long text, piece by piece, kept as int32 arrays (vocabularies stay below 2**31; a
    Python list of ints would cost ~36 bytes per token)."""
    parts = [np.asarray(encode_one(p), dtype=np.int32) for p in pieces(text, max_chars)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)
