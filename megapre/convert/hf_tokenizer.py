"""Tokenizer files across the Hugging Face door.

Import: a directory's tokenizer.json (-> HuggingFaceTokenizer), GPT-2 style vocab.json +
merges.txt (-> GPT2BPETokenizer), a SentencePiece tokenizer.model (-> GPTSentencePieceTokenizer)
or BERT's vocab.txt (hf_wordpiece.py) is copied into the checkpoint directory, so the checkpoint keeps working when the Hugging Face
directory moves. Export: the checkpoint's tokenizer files are written beside the weights with a
tokenizer_config.json naming the transformers class that reads them, so
`AutoTokenizer.from_pretrained(OUT)` works and gives megapre's ids.

SentencePiece models go out as transformers' plain SentencePiece tokenizer
(BertGenerationTokenizer: the model's pieces, no ids added around the text), not as
LlamaTokenizer, whose conversion to a fast tokenizer assumes Llama's normalizer and changes the
ids of models trained with other settings (whitespace, NFKC). Megatron's GPTSentencePieceTokenizer
reads "<s>" in text as characters, so the export sets split_special_tokens; its BERT/T5 flavour
(SentencePieceTokenizer) appends special tokens that it recognizes in text, exported as added
tokens at their ids."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megapre.model.config import ConfigError

from .hf_wordpiece import KINDS as WORDPIECE, import_wordpiece, wordpiece_files

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
    if (hf_dir / "tokenizer.model").is_file():
        _copy(hf_dir, dest, ["tokenizer.model"])
        return {"tokenizer_type": "GPTSentencePieceTokenizer",
                "tokenizer_model": str((dest / "tokenizer.model").resolve())}
    if (hf_dir / "vocab.txt").is_file():
        return import_wordpiece(hf_dir, dest)
    raise ConfigError(f"--hf-dir {hf_dir}: no tokenizer files (tokenizer.json, vocab.json + "
                      "merges.txt, a SentencePiece tokenizer.model, or BERT's vocab.txt); add "
                      "them, or pass --null-tokenizer to import the weights with token ids only")


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
    if kind in WORDPIECE:
        return wordpiece_files(data["vocab_file"], tokenizer.lower_case, max_length), [], None
    if kind in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer"):
        path = Path(data["tokenizer_model"])
        return {"tokenizer_config.json": _json(_spm_config(path, tokenizer, max_length)),
                "tokenizer.model": path.read_bytes()}, [], None
    return {}, [], (f"tokenizer not exported: --tokenizer-type {kind} has no transformers "
                    "tokenizer here; weights and config are")


def _spm_config(path: Path, tokenizer, max_length: int) -> dict:
    """tokenizer_config.json for a SentencePiece model: its own bos/eos/unk/pad pieces, and for
    Megatron's BERT/T5 flavour the tokens it appends, at megapre's ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    cfg: dict = {"tokenizer_class": "BertGenerationTokenizer", "model_max_length": max_length,
                 "sep_token": None}  # the class's default separator would add a token
    for key, idx in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                     ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):
        cfg[key] = sp.id_to_piece(idx) if 0 <= idx < n else None
    if tokenizer.vocab_size == n:  # GPTSentencePieceTokenizer: pieces only, text is text
        cfg["split_special_tokens"] = True
        return cfg
    # Megatron's flavour reads its appended tokens and the model's bos/eos/pad pieces in text as
    # one id each, but not <unk>: transformers would, so the export names no unk token
    cfg["unk_token"] = None
    added = {i: t for t, i in tokenizer.special_tokens().items() if i >= n}
    cfg["added_tokens_decoder"] = {
        str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                 "normalized": False, "single_word": False} for i, t in added.items()}
    names = {"cls_token": tokenizer.cls, "sep_token": tokenizer.sep, "mask_token": tokenizer.mask,
             "pad_token": tokenizer.pad, "bos_token": tokenizer.bos, "eos_token": tokenizer.eos}
    for key, idx in names.items():
        if idx is not None:
            cfg[key] = added.get(idx) or sp.id_to_piece(idx)
    return cfg


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()
