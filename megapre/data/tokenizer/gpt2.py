"""GPT-2's byte-level BPE from vocab.json + merges.txt (GPT2BPETokenizer): exactly the original ids.

Two engines give those ids. The Hugging Face `tokenizers` BPE runs any vocab/merges pair. For GPT-2's
own vocabulary, recognised by a hash of its parsed content, `tiktoken` (when installed) encodes the
same ids 3-5x faster: its rank-based merging equals merge-list BPE for this vocabulary (tested here
against an independent implementation of GPT-2's algorithm), which is not guaranteed for other
vocabularies, so those always use the merge-list engine.

Nothing is registered as an added token: "<|endoftext|>" inside text is tokenized as text, as GPT-2
and Megatron do; append `eod` yourself.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from .base import TokenizerConfig, TokenizerError, read_text, reject_unused, require_file
from .hf import HFBackedTokenizer, hf, require_hf

try:
    import tiktoken
except ImportError:  # optional: the merge-list engine covers every vocabulary
    tiktoken = None

GPT2_EOD = "<|endoftext|>"
# GPT-2's pre-tokenization split, as published with the model.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's released files, by sha256 of their bytes (the common copies: Hugging Face, Megatron's).
GPT2_FILE_SHA256 = {
    "vocab_file": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merge_file": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# sha256 of (sorted vocab items, merges) of the same: recognises re-formatted copies too.
GPT2_CONTENT_SHA256 = "158b3bd6e05497a606672c2df858875b2e03284dab725d3a08732715c71f014b"


def _is_token_map(vocab: Any) -> bool:
    return isinstance(vocab, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in vocab.items()
    )


def load_bpe_vocab(path: Path, flag: str = "--vocab-file", validate: bool = True) -> dict[str, int]:
    try:
        vocab = json.loads(read_text(path, flag))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{flag} {path}: not valid JSON ({e}); expected GPT-2's vocab.json") from e
    if validate and not _is_token_map(vocab):
        raise TokenizerError(f"{flag} {path}: expected a JSON object mapping tokens to ids (GPT-2 vocab.json)")
    if not vocab:
        raise TokenizerError(f"{flag} {path}: the vocabulary is empty")
    return vocab


def load_bpe_merges(path: Path, vocab: dict[str, int], flag: str = "--merge-file") -> list[tuple[str, str]]:
    merges = []
    for lineno, line in enumerate(read_text(path, flag).split("\n"), 1):
        if (lineno == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(
                f"{flag} {path}:{lineno}: expected two space-separated tokens per line, got {line[:80]!r}"
                " (is this GPT-2's merges.txt?)"
            )
        for part in (parts[0], parts[1], parts[0] + parts[1]):
            if part not in vocab:
                raise TokenizerError(
                    f"{flag} {path}:{lineno}: merge token {part!r} is not in the vocabulary; "
                    "the vocab and merge files do not belong together"
                )
        merges.append((parts[0], parts[1]))
    return merges


def content_sha256(vocab: dict[str, int], merges: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    digest.update(json.dumps(merges, ensure_ascii=False).encode())
    return digest.hexdigest()


def _char_to_byte_table() -> dict[int, int]:
    """GPT-2 spells each byte as a printable character: printable bytes as themselves, the others
    as the characters from U+0100 upward, in byte order. (A str.translate table: char -> byte.)"""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))
    return {(b if b in printable else next(shifted)): b for b in range(256)}


def _tiktoken_encoding(vocab: dict[str, int], eod: int) -> Any:
    table = _char_to_byte_table()
    ranks = {token.translate(table).encode("latin-1"): idx for token, idx in vocab.items() if token != GPT2_EOD}
    return tiktoken.Encoding("megapre-gpt2", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={GPT2_EOD: eod})


class GPT2BPETokenizer(HFBackedTokenizer):
    """GPT-2's byte-level BPE: exactly the original ids; eod is <|endoftext|> (50256 for GPT-2)."""

    def __init__(self, config: TokenizerConfig) -> None:
        require_hf(config.tokenizer_type)
        reject_unused(config, ("vocab_file", "merge_file"))
        vocab_path = require_file(config, "vocab_file", "GPT-2's vocab.json")
        merge_path = require_file(config, "merge_file", "GPT-2's merges.txt (the BPE merge rules)")
        super().__init__(config, {"vocab_file": vocab_path, "merge_file": merge_path})
        known = self.file_digests() == GPT2_FILE_SHA256  # the released files: nothing to validate
        vocab = load_bpe_vocab(vocab_path, validate=not known)
        if GPT2_EOD not in vocab:
            raise TokenizerError(
                f"--vocab-file {vocab_path}: no {GPT2_EOD} token, so there is no end-of-document id; "
                "use GPT-2's vocab.json or a BPE vocabulary trained with that special token"
            )
        self.vocab_size = max(vocab.values()) + 1
        self.eod = vocab[GPT2_EOD]
        merges = [] if known else load_bpe_merges(merge_path, vocab)
        self._tiktoken = None
        if tiktoken is not None and (known or content_sha256(vocab, merges) == GPT2_CONTENT_SHA256):
            self._tiktoken = _tiktoken_encoding(vocab, self.eod)
            return
        try:
            model = (hf.models.BPE.from_file(str(vocab_path), str(merge_path)) if known
                     else hf.models.BPE(vocab=vocab, merges=merges))
        except Exception as e:  # the library raises a bare Exception on inconsistent files
            raise TokenizerError(f"--vocab-file {vocab_path} / --merge-file {merge_path}: {e}") from e
        tok = hf.Tokenizer(model)
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = hf.decoders.ByteLevel()
        self._set_backend(tok)

    @property
    def engine(self) -> str:
        return "tiktoken" if self._tiktoken is not None else "tokenizers"

    def encode(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return super().encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tiktoken is not None:
            encode = self._tiktoken.encode_ordinary  # one thread: workers are the parallelism
            return [encode(t) for t in texts]
        return super().encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        if self._tiktoken is not None:
            return self._tiktoken.decode(self._check_ids(ids), errors="replace")
        return super().decode(ids)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"engine": self.engine}  # the engine never changes the ids
