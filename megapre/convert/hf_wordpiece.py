"""BERT's WordPiece vocab.txt across the Hugging Face door.

megapre's BertWordPiece tokenizers append [BOS] and [EOS] when vocab.txt lacks them (as
Megatron), so a model trained with one has two more rows than the file has lines. Export writes
those two tokens into vocab.txt, so the exported BertTokenizer has the model's vocabulary; import
uses a vocab.txt holding both as is, and turns any other (transformers' own, exactly the model's
vocabulary) into a tokenizer.json through BertTokenizerFast."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

KINDS = ("BertWordPieceLowerCase", "BertWordPieceCase")
_APPENDED = ("[BOS]", "[EOS]")


def _lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def import_wordpiece(hf_dir: Path, dest: Path) -> dict:
    """The data-args fields for hf_dir's vocab.txt; its files go to `dest`."""
    path = hf_dir / "tokenizer_config.json"
    lower = json.loads(path.read_text()).get("do_lower_case", True) if path.is_file() else True
    dest.mkdir(parents=True, exist_ok=True)
    if set(_APPENDED) <= set(_lines(hf_dir / "vocab.txt")):
        shutil.copy2(hf_dir / "vocab.txt", dest / "vocab.txt")
        return {"tokenizer_type": KINDS[0] if lower else KINDS[1],
                "vocab_file": str((dest / "vocab.txt").resolve())}
    from transformers import BertTokenizerFast

    BertTokenizerFast.from_pretrained(str(hf_dir), do_lower_case=lower).save_pretrained(str(dest))
    return {"tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_model": str((dest / "tokenizer.json").resolve())}


def wordpiece_files(vocab_file: str, lower_case: bool, max_length: int) -> dict[str, bytes]:
    """vocab.txt (with [BOS] and [EOS]) and a BertTokenizer tokenizer_config.json."""
    lines = _lines(Path(vocab_file))
    lines += [t for t in _APPENDED if t not in set(lines)]
    cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": lower_case,
           "model_max_length": max_length, "unk_token": "[UNK]", "sep_token": "[SEP]",
           "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    return {"tokenizer_config.json": (json.dumps(cfg, indent=1) + "\n").encode(),
            "vocab.txt": ("\n".join(lines) + "\n").encode()}
