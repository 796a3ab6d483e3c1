"""Tokenizer files across the Hugging Face door.

Import: a directory's tokenizer.json (-> HuggingFaceTokenizer), GPT-2 style vocab.json +
merges.txt (-> GPT2BPETokenizer) or BERT's vocab.txt (-> BertWordPiece[Lower]Case) is copied into
the checkpoint directory, so the checkpoint keeps working when the Hugging Face directory moves.
Export: the checkpoint's tokenizer files are written beside the weights with a
tokenizer_config.json naming the transformers class that reads them, so
`AutoTokenizer.from_pretrained(OUT)` works."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megapre.model.config import ConfigError

TOKENIZER_DIR = "hf_tokenizer"
_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def import_tokenizer(hf_dir: Path, save_dir: Path, null_vocab: int | None) -> dict:
    """The data-args fields of the imported tokenizer; its files go to save_dir/hf_tokenizer.
    `null_vocab`: no tokenizer files wanted (--null-tokenizer): ids 0..vocab-1, the last EOD."""
    if null_vocab is not None:
        return {"tokenizer_type": "NullTokenizer", "vocab_size": null_vocab - 1}
    dest = save_dir / TOKENIZER_DIR
    if (hf_dir / "tokenizer.json").is_file():
        _copy(hf_dir, dest, ["tokenizer.json", *_SIDE_FILES])
        return {"tokenizer_type": "HuggingFaceTokenizer",
                "tokenizer_model": str((dest / "tokenizer.json").resolve())}
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        _copy(hf_dir, dest, ["vocab.json", "merges.txt"])
        return {"tokenizer_type": "GPT2BPETokenizer",
                "vocab_file": str((dest / "vocab.json").resolve()),
                "merge_file": str((dest / "merges.txt").resolve())}
    if (hf_dir / "vocab.txt").is_file():
        return _import_wordpiece(hf_dir, dest)
    raise ConfigError(f"--hf-dir {hf_dir}: no tokenizer files (tokenizer.json, vocab.json + "
                      "merges.txt, or vocab.txt); add them, or pass --null-tokenizer to import "
                      "the weights with token ids only")


def _import_wordpiece(hf_dir: Path, dest: Path) -> dict:
    """BERT's vocab.txt. megapre's BertWordPiece appends [BOS] and [EOS] when absent (as
    Megatron), which would outgrow the model's vocabulary: a vocab.txt with both (as hf-export
    writes) is used as is, any other becomes a tokenizer.json through transformers'
    BertTokenizerFast (the same WordPiece, exactly the file's tokens)."""
    path = hf_dir / "tokenizer_config.json"
    lower = json.loads(path.read_text()).get("do_lower_case", True) if path.is_file() else True
    tokens = set((hf_dir / "vocab.txt").read_text(encoding="utf-8").split("\n"))
    if {"[BOS]", "[EOS]"} <= tokens:
        _copy(hf_dir, dest, ["vocab.txt"])
        return {"tokenizer_type": "BertWordPieceLowerCase" if lower else "BertWordPieceCase",
                "vocab_file": str((dest / "vocab.txt").resolve())}
    from transformers import BertTokenizerFast

    BertTokenizerFast.from_pretrained(str(hf_dir), do_lower_case=lower).save_pretrained(str(dest))
    return {"tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_model": str((dest / "tokenizer.json").resolve())}


def _copy(src: Path, dest: Path, names: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)


def export_tokenizer(data: dict, tokenizer, max_length: int) -> tuple[dict[str, bytes], list[Path],
                                                                        str | None]:
    """(generated files, files to copy, a note when AutoTokenizer will not load OUT)."""
    kind = data["tokenizer_type"]
    if tokenizer.describe().get("added_tokens"):
        return {}, [], (f"tokenizer not exported: {kind} with added tokens "
                        f"({', '.join(tokenizer.describe()['added_tokens'])}) has no transformers "
                        "equivalent here; weights and config are")
    if kind == "GPT2BPETokenizer":
        cfg = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length,
               "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
        # Megatron's names (gpt2-vocab.json, gpt2-merges.txt) become transformers' names
        return {"tokenizer_config.json": _json(cfg),
                "vocab.json": Path(data["vocab_file"]).read_bytes(),
                "merges.txt": Path(data["merge_file"]).read_bytes()}, [], None
    if kind in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        return _wordpiece_files(data["vocab_file"], tokenizer, max_length), [], None
    if kind == "HuggingFaceTokenizer":
        path = Path(data["tokenizer_model"])
        path = path / "tokenizer.json" if path.is_dir() else path
        side = [path.parent / n for n in _SIDE_FILES if (path.parent / n).is_file()]
        generated = {} if side else {"tokenizer_config.json": _json(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length})}
        if path.name != "tokenizer.json":
            generated["tokenizer.json"] = path.read_bytes()
            return generated, side, None
        return generated, [path, *side], None
    return {}, [], (f"tokenizer not exported: --tokenizer-type {kind} has no transformers "
                    "tokenizer here; weights and config are")


def _wordpiece_files(vocab_file: str, tokenizer, max_length: int) -> dict[str, bytes]:
    """vocab.txt and a BertTokenizer config. megapre's WordPiece appends [BOS] and [EOS] when
    vocab.txt lacks them (as Megatron); they are written out too, so the exported tokenizer has
    as many tokens as the model's vocabulary."""
    lines = Path(vocab_file).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines += [t for t in ("[BOS]", "[EOS]") if t not in set(lines)]
    cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lower_case,
           "model_max_length": max_length, "unk_token": "[UNK]", "sep_token": "[SEP]",
           "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    return {"tokenizer_config.json": _json(cfg), "vocab.txt": ("\n".join(lines) + "\n").encode()}


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()
