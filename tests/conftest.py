"""Shared pytest set-up: the `cuda` marker skips without a GPU; `isa` runs a test once per CPU
kernel path (portable scalar and AVX2) so both are covered on an AVX2 machine.

Helpers the test modules import (`from conftest import ...`):

- `SHARED_DATA`: the project's test data (GPT-2 and BERT vocabularies, tinyshakespeare,
  wikitext-2, ...), by default `../shared/data` beside the checkout. The environment variable
  `MEGAPRE_SHARED_DATA` points it elsewhere; an empty directory runs the suite as on a fresh clone
  without the data (`MEGAPRE_SHARED_DATA=$(mktemp -d) python -m pytest -q tests`), where the tests
  that need a file skip and name it.
- `write_counting_corpus`: a small synthetic GPT corpus (counting sequences) that a model learns in a
  few steps (`COUNTING_VOCAB` ids, the last one the end-of-document token).
- `write_bert_corpus` / `bert_args`: a sentence-split corpus of BERT word ids and the flags of a tiny
  BERT on it (skips without the shared BERT vocabulary).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import megapre.ops as ops

SHARED_DATA = Path(os.environ.get("MEGAPRE_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")


COUNTING_VOCAB = 40  # ids 0..38 and the end-of-document token 39


def write_counting_corpus(prefix, docs: int = 300, *, eod: int = 39, seed: int = 0) -> str:
    """Write `docs` documents of counting sequences (t, t+k, t+2k, ... mod 39; k in 1..3, 20 to 59
    tokens), each ending in `eod`, as the indexed dataset `prefix` (uint16); returns the prefix.
    Ids stay below 39, so with NullTokenizer --vocab-size 39 the default `eod` is its EOD (= the
    vocabulary size); GPT-2 runs pass its EOD, 50256."""
    from megapre.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for _ in range(docs):
            start, k, n = rng.integers(0, 39), rng.integers(1, 4), rng.integers(20, 60)
            b.add_document(np.append((start + k * np.arange(n)) % 39, eod))
    return str(prefix)


def tiny_gpt_flags(corpus: str, work, *extra: str, **settings) -> list[str]:
    """megapre.pretrain flags of a 2-layer GPT on a counting corpus, on the CPU, one process's
    worth of settings; `settings` override a flag's value by field name (global_batch_size=8),
    `extra` flags are appended."""
    values = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
              "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 3, "lr": 3e-3,
              "hidden_dropout": 0, "attention_dropout": 0, "eval_iters": 0, "log_interval": 1,
              "split": "100,0,0", "vocab_size": COUNTING_VOCAB - 1,
              "make_vocab_size_divisible_by": 8, "num_workers": 0, "device": "cpu", **settings}
    flags = ["--model", "gpt", "--data-path", corpus, "--tokenizer-type", "NullTokenizer",
             "--data-cache-path", str(work / "cache"), "--metrics-path",
             str(work / "metrics.jsonl")]
    for name, value in values.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags + list(extra)



def train_in_process(flags: list[str]):
    """Parse megapre.pretrain flags and train in this process; returns the (closed) Trainer."""
    from megapre.cli.flags import parse_config
    from megapre.train.loop import Trainer

    trainer = Trainer(parse_config(flags))
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _isas() -> list[str]:
    info = ops.backend_info()
    if info["cpu"] != "compiled":
        return ["reference"]
    import megapre._C as C

    isas = ["scalar"]
    if C.cpu_has_avx2():
        isas.append("avx2")
    if getattr(C, "cpu_has_avx512vnni", lambda: False)():
        isas.append("avx512vnni")
    return isas


@pytest.fixture(params=_isas())
def isa(request):
    """Run the test with the CPU kernels forced onto one ISA, restoring 'auto' after."""
    if request.param != "reference":
        ops.set_cpu_isa(request.param)
    yield request.param
    if request.param != "reference":
        ops.set_cpu_isa("auto")


def write_bert_corpus(directory: Path) -> str:
    """Sentence-split documents of random word ids (BERT vocabulary), as preprocess
    --split-sentences writes them; skips the test without the shared BERT vocabulary."""
    vocab = SHARED_DATA / "bert" / "vocab.txt"
    if not vocab.is_file():
        pytest.skip(f"BERT vocabulary {vocab} is absent")
    from megapre.data.indexed import IndexedDatasetBuilder

    prefix = str(directory / "ids_text_sentence")
    rng = np.random.default_rng(1)
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for _ in range(120):
            sents = [rng.integers(1000, 1060, rng.integers(4, 12)) for _ in range(rng.integers(2, 6))]
            b.add_document(np.concatenate(sents).astype(np.uint16), [len(s) for s in sents])
    return prefix


def bert_args(corpus: str, cache: Path) -> list[str]:
    """megapre.pretrain flags of a tiny BERT on `write_bert_corpus` data (CPU, no dropout)."""
    return ["--model", "bert", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "2", "--eval-interval", "2",
            "--eval-iters", "2", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--data-path", corpus, "--split", "80,20,0", "--tokenizer-type",
            "BertWordPieceLowerCase", "--vocab-file", str(SHARED_DATA / "bert" / "vocab.txt"),
            "--num-workers", "0", "--device", "cpu", "--data-cache-path", str(cache)]
