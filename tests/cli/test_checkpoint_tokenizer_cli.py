"""megapre.generate and megapre.evaluate take the tokenizer from the checkpoint's config, with
--vocab-file (etc.) overrides: an override whose contents differ from the tokenizer the
checkpoint was trained with (two swapped vocabulary lines) is refused at start, in one line with
both fingerprints, unless --allow-tokenizer-mismatch."""
from __future__ import annotations

import importlib

import pytest

from megapre.cli.flags import parse_config
from megapre.train.checkpoint import save_checkpoint
from megapre.train.runtime import build_runtime

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
         "the", "cat", "sat", "on", "mat"]


@pytest.fixture
def saved(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    cfg = parse_config(["--model", "gpt", "--num-layers", "1", "--hidden-size", "32",
                        "--num-attention-heads", "4", "--seq-length", "16",
                        "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(vocab),
                        "--make-vocab-size-divisible-by", "8", "--device", "cpu",
                        "--data-path", "unused"])
    rt = build_runtime(cfg)
    try:
        save_checkpoint(tmp_path / "ckpt", 1, rt.model, None, rt.mesh, config=cfg.to_dict(),
                        tokenizer=rt.tokenizer.describe())
    finally:
        rt.close()
    swapped = tmp_path / "swapped.txt"
    lines = list(WORDS)
    lines[-1], lines[-2] = lines[-2], lines[-1]
    swapped.write_text("\n".join(lines) + "\n")
    return tmp_path / "ckpt", vocab, swapped


def _generate(args, capsys):
    code = importlib.import_module("megapre.cli.generate").main(
        [*args, "--prompt", "the cat", "--max-new-tokens", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def test_swapped_vocab_override_is_refused(saved, capsys):
    ckpt, vocab, swapped = saved
    code, out, err = _generate(["--load", str(ckpt), "--vocab-file", str(swapped)], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megapre.generate: error: the tokenizer "
                                                   "differs"), err
    assert "--allow-tokenizer-mismatch" in lines[0] and str(swapped) in lines[0]
    code, out, err = _generate(["--load", str(ckpt), "--vocab-file", str(vocab)], capsys)
    assert code == 0 and "tokenizer" not in err, err
    code, out, err = _generate(["--load", str(ckpt), "--vocab-file", str(swapped),
                                "--allow-tokenizer-mismatch"], capsys)
    assert code == 0 and "continuing (--allow-tokenizer-mismatch)" in err, err


def test_evaluate_checks_the_tokenizer_too(saved, capsys):
    ckpt, _, swapped = saved
    code = importlib.import_module("megapre.cli.evaluate").main(
        ["--load", str(ckpt), "--vocab-file", str(swapped), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "the tokenizer differs" in err and len(err.strip().splitlines()) == 1
