"""Small GPT checkpoints for the inference tests, made in this process by a short pretraining
run (megapre.train.loop.Trainer with --save): one on counting sequences (NullTokenizer, a few
seconds) and one on a slice of WikiText-2 with GPT-2's BPE (real text, for perplexity and the
lm-eval adapter; skips without the shared GPT-2 files or WikiText-2)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import COUNTING_VOCAB, SHARED_DATA, write_counting_corpus
from conftest import train_in_process as _train

GPT2_DIR = SHARED_DATA / "gpt2"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2" / "test.txt"


def _tiny_gpt_flags(seq: int, save: Path, cache: Path, iters: int, lr: float = 3e-3
                    ) -> list[str]:
    return ["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", str(seq), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", str(iters), "--lr", str(lr),
            "--lr-warmup-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--eval-interval", str(iters), "--eval-iters", "1", "--log-interval", str(iters),
            "--split", "100,0,0", "--num-workers", "0", "--device", "cpu",
            "--data-cache-path", str(cache), "--save", str(save)]


def counting_checkpoint(work: Path, iters: int = 10) -> str:
    """A 2-layer GPT (seq 32) trained `iters` steps on counting sequences; ids as text."""
    corpus = write_counting_corpus(str(work / "count_text_document"))
    save = work / "ckpt_counting"
    _train([*_tiny_gpt_flags(32, save, work / "cache", iters), "--data-path", corpus,
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(COUNTING_VOCAB - 1),
            "--make-vocab-size-divisible-by", "8"])
    return str(save)


def require_gpt2_wikitext() -> None:
    for path in (GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt", WIKITEXT_TEST):
        if not path.is_file():
            pytest.skip(f"{path} is absent (shared test data)")


def gpt2_flags() -> list[str]:
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2_DIR / "vocab.json"),
            "--merge-file", str(GPT2_DIR / "merges.txt")]


def wikitext_slice(num_bytes: int) -> str:
    """The first `num_bytes` bytes of WikiText-2 test (cut back to whole UTF-8 characters)."""
    return WIKITEXT_TEST.read_bytes()[:num_bytes].decode("utf-8", errors="ignore")


def gpt2_checkpoint(work: Path, iters: int = 10, train_bytes: int = 200_000) -> str:
    """A 2-layer GPT (seq 64, GPT-2 BPE) trained `iters` steps on the first `train_bytes`
    bytes of WikiText-2 test, one document per non-empty line."""
    require_gpt2_wikitext()
    from megapre.cli.preprocess_data import main as preprocess

    text = work / "wiki_slice.txt"
    text.write_text(wikitext_slice(train_bytes))
    prefix = work / "wiki"
    code = preprocess(["--input", str(text), "--output-prefix", str(prefix), "--append-eod",
                       "--workers", "0", *gpt2_flags()])
    assert code == 0
    save = work / "ckpt_gpt2"
    _train([*_tiny_gpt_flags(64, save, work / "cache", iters, lr=3e-2), "--data-path",
            f"{prefix}_text_document", *gpt2_flags()])
    return str(save)
