"""Tokenizers run by the Hugging Face `tokenizers` library (Rust, batched): BERT WordPiece from
vocab.txt, any tokenizer.json, and the shared base that GPT-2's BPE (gpt2.py) also uses.

BERT is assembled here from its raw vocabulary (not through the library's convenience class) so that
nothing is registered as an "added token": text containing "[SEP]" is tokenized as ordinary text, as
the original BERT tokenizer (and Megatron) does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .base import (
    TokenizerConfig,
    TokenizerError,
    Tokenizer,
    read_text,
    reject_unused,
    require_file,
)

try:
    import tokenizers as hf
except ImportError:  # pragma: no cover - exercised only where the dependency is missing
    hf = None


def require_hf(kind: str) -> None:
    if hf is None:
        raise TokenizerError(f"{kind} needs the Hugging Face `tokenizers` package: pip install tokenizers")


class HFBackedTokenizer(Tokenizer):
    """Shared encode/decode over a `tokenizers.Tokenizer` (never adds special tokens, never pads)."""

    _tok: Any

    def _set_backend(self, tok: Any) -> None:
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self._batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)


# ------------------------------------------------------------------------------------ BERT WordPiece
BERT_SPECIALS = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}


def load_wordpiece_vocab(path: Path, flag: str = "--vocab-file") -> dict[str, int]:
    """BERT's vocab.txt: one token per line, id = line number (a later duplicate wins, as in BERT)."""
    text = read_text(path, flag)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {line.strip(): i for i, line in enumerate(lines)}
    if len(vocab) < 5:
        raise TokenizerError(f"{flag} {path}: only {len(vocab)} tokens; expected BERT's vocab.txt")
    missing = [t for t in BERT_SPECIALS.values() if t not in vocab]
    if missing:
        raise TokenizerError(
            f"{flag} {path}: missing the BERT special tokens {missing}; expected a BERT vocab.txt "
            "(one WordPiece token per line)"
        )
    return vocab


class BertWordPieceTokenizer(HFBackedTokenizer):
    """BERT WordPiece (BertWordPieceLowerCase / BertWordPieceCase).

    As Megatron, [BOS] and [EOS] are appended to the vocabulary when absent (vocab.txt size + 2) and
    eod is [EOS], so --append-eod writes the ids Megatron writes.
    """

    def __init__(self, config: TokenizerConfig, lower_case: bool) -> None:
        require_hf(config.tokenizer_type)
        reject_unused(config, ("vocab_file",))
        path = require_file(config, "vocab_file", "BERT's vocab.txt")
        super().__init__(config, {"vocab_file": path})
        vocab = load_wordpiece_vocab(path)
        for token in ("[BOS]", "[EOS]"):
            vocab.setdefault(token, max(vocab.values()) + 1)
        tok = hf.Tokenizer(hf.models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = hf.normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lower_case, lowercase=lower_case
        )
        tok.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
        tok.decoder = hf.decoders.WordPiece(prefix="##", cleanup=True)
        self._set_backend(tok)
        self.lower_case = lower_case
        self.vocab_size = max(vocab.values()) + 1
        for name, token in BERT_SPECIALS.items():
            setattr(self, name, vocab[token])
        self.bos, self.eod = vocab["[BOS]"], vocab["[EOS]"]
        self._continuation = _prefix_mask(vocab, "##", self.vocab_size)

    def continuation_mask(self) -> np.ndarray:
        return self._continuation.copy()

    def rebuild_kwargs(self) -> dict[str, Any]:
        return {"lower_case": self.lower_case}


def _prefix_mask(vocab: dict[str, int], prefix: str, size: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    for token, idx in vocab.items():
        if token.startswith(prefix) and len(token) > len(prefix) and idx < size:
            mask[idx] = True
    return mask


# ------------------------------------------------------------------------------ any tokenizer.json
# Where no tokenizer_config.json names them, special tokens are recognised by their usual spellings.
_USUAL = {
    "eod": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|im_end|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}
_CONFIG_KEYS = {"eod": "eos_token", "bos": "bos_token", "pad": "pad_token", "cls": "cls_token",
                "sep": "sep_token", "mask": "mask_token", "unk": "unk_token"}


def _resolve_tokenizer_json(config: TokenizerConfig) -> Path:
    value = config.tokenizer_model
    if value is None:
        raise TokenizerError(
            "HuggingFaceTokenizer needs --tokenizer-model: a tokenizer.json file or a directory holding one"
        )
    path = Path(value).expanduser()
    if path.is_dir():
        candidate = path / "tokenizer.json"
        if not candidate.is_file():
            raise TokenizerError(
                f"--tokenizer-model {value}: directory has no tokenizer.json; megapre loads local "
                "tokenizer.json files only (save one with `tokenizer.save_pretrained(dir)` in transformers)"
            )
        return candidate
    if not path.exists():
        hint = " (downloads from the Hub are not supported: pass a local path)" if "/" in str(value) else ""
        raise TokenizerError(
            f"--tokenizer-model {value}: no such file or directory; pass a tokenizer.json or its directory{hint}"
        )
    return require_file(config, "tokenizer_model", "a tokenizer.json")


def _special_token_config(directory: Path) -> tuple[dict[str, str], list[Path]]:
    """Special-token strings named by tokenizer_config.json / special_tokens_map.json beside the model."""
    found: dict[str, str] = {}
    used: list[Path] = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: cannot parse ({e}); fix or remove the file") from e
        used.append(path)
        for ours, key in _CONFIG_KEYS.items():
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[ours] = value
    return found, used


class HuggingFaceTokenizer(HFBackedTokenizer):
    """Any local tokenizer.json; special ids from tokenizer_config.json beside it, else usual spellings."""

    def __init__(self, config: TokenizerConfig) -> None:
        require_hf(config.tokenizer_type)
        reject_unused(config, ("tokenizer_model",))
        path = _resolve_tokenizer_json(config)
        named, extra = _special_token_config(path.parent)
        files = {"tokenizer_model": path} | {f"tokenizer_model:{p.name}": p for p in extra}
        super().__init__(config, files)
        try:
            tok = hf.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise TokenizerError(f"--tokenizer-model {path}: not a valid tokenizer.json ({e})") from e
        self._set_backend(tok)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        for name, spellings in _USUAL.items():
            choices = ((named[name],) if name in named else ()) + spellings  # named first
            setattr(self, name, next((tok.token_to_id(s) for s in choices if tok.token_to_id(s) is not None), None))
        model = tok.model
        prefix = getattr(model, "continuing_subword_prefix", None) if type(model).__name__ == "WordPiece" else None
        self._continuation = (
            _prefix_mask(tok.get_vocab(with_added_tokens=True), prefix, self.vocab_size)
            if prefix else np.zeros(self.vocab_size, dtype=bool)
        )

    def continuation_mask(self) -> np.ndarray:
        return self._continuation.copy()
