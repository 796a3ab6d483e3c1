"""Megatron-LM's own example launch scripts (tests/fixtures/megatron_examples, commit
d98e8a64dd) run on megapre unchanged except for sizes: layers, widths, sequence length, batch
sizes, iteration counts and the number of processes shrink to CPU scale, every flag stays. They
call `pretrain_gpt.py` / `pretrain_bert.py` from the working directory, as in a Megatron
checkout; here those are megapre's entry scripts. The Llama-3 script's FP8 setting is refused by
name."""
from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, write_counting_corpus

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "megatron_examples"
GPT2 = SHARED_DATA / "gpt2"
BERT_VOCAB = SHARED_DATA / "bert" / "vocab.txt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scaled(name: str, sizes: list[tuple[str, str]], tmp: Path) -> Path:
    """The fixture script with each size replaced (every `old` must occur: a changed fixture
    fails here instead of silently running at full size)."""
    text = (FIXTURES / name).read_text()
    for old, new in sizes:
        assert old in text, f"{name}: {old!r} not found"
        text = text.replace(old, new)
    path = tmp / name
    path.write_text(text)
    return path


def _run(script: Path, args: list[str], cwd: Path, timeout: int = 900
         ) -> subprocess.CompletedProcess:
    for entry in ("pretrain_gpt.py", "pretrain_bert.py"):
        if not (cwd / entry).exists():
            (cwd / entry).symlink_to(ROOT / entry)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MASTER_PORT": str(_free_port())}
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _consumed(stdout: str) -> list[int]:
    return [int(m) for m in re.findall(r"consumed samples (\d+)", stdout)]


def _port_free_script(sizes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The GPT-3 and BERT scripts hard-code MASTER_PORT=29500; a free port keeps parallel test
    runs apart (not a flag of the run)."""
    return sizes + [("MASTER_PORT=29500", f"MASTER_PORT={_free_port()}")]


@pytest.mark.slow
def test_gpt3_example_runs_scaled_down(tmp_path):
    if not (GPT2 / "vocab.json").is_file():
        pytest.skip(f"GPT-2 vocabulary {GPT2} is absent")
    data = write_counting_corpus(tmp_path / "count_text_document", docs=2000, eod=50256)
    script = _scaled("train_gpt3_175b_distributed.sh", _port_free_script([
        ("GPUS_PER_NODE=8", "GPUS_PER_NODE=4"),
        ("--num-layers 96", "--num-layers 4"), ("--hidden-size 12288", "--hidden-size 64"),
        ("--num-attention-heads 96", "--num-attention-heads 4"),
        ("--seq-length 2048", "--seq-length 64"),
        ("--max-position-embeddings 2048", "--max-position-embeddings 64"),
        ("--global-batch-size 1536", "--global-batch-size 8"),
        ('"0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"', '"0:2 256:4 768:8"'),
        ("--train-iters 500000", "--train-iters 6"), ("--lr-decay-iters 430000", "--lr-decay-iters 6"),
        ("--tensor-model-parallel-size 8", "--tensor-model-parallel-size 2"),
        ("--pipeline-model-parallel-size 16", "--pipeline-model-parallel-size 2"),
        ("--log-interval 100", "--log-interval 1"), ("--save-interval 10000", "--save-interval 3"),
        ("--eval-interval 1000", "--eval-interval 3"), ("--eval-iters 10", "--eval-iters 1")]),
        tmp_path)
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    proc = _run(script, [str(ckpt), str(tb), str(GPT2 / "vocab.json"), str(GPT2 / "merges.txt"),
                         data], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # the batch-size schedule: 2 until 256 tokens (4 samples), 4 until 768 (12), then 8
    assert _consumed(proc.stdout) == [2, 4, 8, 12, 20, 28]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert any(tb.rglob("events.out.tfevents.*"))


def _bert_corpus(prefix: Path, docs: int = 1500) -> str:
    """Sentence-split documents of BERT word ids (enough that --split 949,50,1 gives the test
    split a document)."""
    from megapre.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(1)
    with IndexedDatasetBuilder(str(prefix), np.uint16) as b:
        for _ in range(docs):
            sents = [rng.integers(1000, 1060, rng.integers(4, 12)) for _ in range(rng.integers(2, 6))]
            b.add_document(np.concatenate(sents).astype(np.uint16), [len(s) for s in sents])
    return str(prefix)


@pytest.mark.slow
def test_bert_example_runs_scaled_down(tmp_path):
    if not BERT_VOCAB.is_file():
        pytest.skip(f"BERT vocabulary {BERT_VOCAB} is absent")
    data = _bert_corpus(tmp_path / "ids_text_sentence")
    script = _scaled("train_bert_340m_distributed.sh", _port_free_script([
        ("GPUS_PER_NODE=8", "GPUS_PER_NODE=4"),
        ("--num-layers 24", "--num-layers 4"), ("--hidden-size 1024", "--hidden-size 64"),
        ("--num-attention-heads 16", "--num-attention-heads 4"),
        ("--seq-length 512", "--seq-length 64"),
        ("--max-position-embeddings 512", "--max-position-embeddings 64"),
        ("--micro-batch-size 4", "--micro-batch-size 2"),
        ("--global-batch-size 32", "--global-batch-size 4"),
        ("--train-iters 1000000", "--train-iters 4"), ("--lr-decay-iters 990000", "--lr-decay-iters 4"),
        ("--tensor-model-parallel-size 8", "--tensor-model-parallel-size 2"),
        ("--pipeline-model-parallel-size 16", "--pipeline-model-parallel-size 2"),
        ("--log-interval 100", "--log-interval 1"), ("--save-interval 10000", "--save-interval 2"),
        ("--eval-interval 1000", "--eval-interval 2"), ("--eval-iters 10", "--eval-iters 1")]),
        tmp_path)
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    proc = _run(script, [str(ckpt), str(tb), str(BERT_VOCAB), data], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _consumed(proc.stdout) == [4, 8, 12, 16]
    assert "BertWordPieceLowerCase" in proc.stdout  # pretrain_bert.py's default tokenizer
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


LLAMA_SIZES = [
    ("GPUS_PER_NODE=8", "GPUS_PER_NODE=2"), ("NUM_LAYERS=32", "NUM_LAYERS=2"),
    ("--hidden-size 4096", "--hidden-size 64"), ("--ffn-hidden-size 14336", "--ffn-hidden-size 224"),
    ("--num-attention-heads 32", "--num-attention-heads 4"),
    ("--num-query-groups 8", "--num-query-groups 2"), ("--kv-channels 128", "--kv-channels 16"),
    ("SEQ_LENGTH=8192", "SEQ_LENGTH=64"), ("MAX_POSITION_EMBEDDINGS=8192", "MAX_POSITION_EMBEDDINGS=64"),
    ("GLOBAL_BATCH_SIZE=128", "GLOBAL_BATCH_SIZE=4"),
    ("--train-samples 1953125000", "--train-samples 40"),
    ("--lr-decay-samples 1949218748", "--lr-decay-samples 36"),
    ("--lr-warmup-samples 3906252", "--lr-warmup-samples 8"),
    ("--vocab-size 128256", "--vocab-size 1000"), ("--eval-iters 32", "--eval-iters 1"),
    ("--eval-interval 100", "--eval-interval 5"), ("--save-interval 1000", "--save-interval 5")]


@pytest.mark.slow
def test_llama3_example_runs_scaled_down_in_bf16(tmp_path):
    script = _scaled("train_llama3_8b_h100_fp8.sh", LLAMA_SIZES + [('DTYPE="fp8"', 'DTYPE="bf16"')],
                     tmp_path)
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    proc = _run(script, [str(ckpt), str(tb), "MOCK", "MOCK"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _consumed(proc.stdout) == [4 * i for i in range(1, 11)]  # 40 samples / 4
    assert "bf16" in proc.stdout and "no-ops" in proc.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (tmp_path / "benchmark_cache_llama3_8b_fp8" / "mock").is_dir()


def test_llama3_example_fp8_is_refused_by_name(tmp_path):
    """The script as published (DTYPE="fp8"): every rank refuses --fp8-format in one line and
    nothing trains. (The script ends with `set +x`, so its own exit status stays 0.)"""
    script = _scaled("train_llama3_8b_h100_fp8.sh", LLAMA_SIZES, tmp_path)
    proc = _run(script, [str(tmp_path / "ckpt"), str(tmp_path / "tb"), "MOCK", "MOCK"], tmp_path,
                timeout=300)
    refusal = "pretrain_gpt.py: error: --fp8-format: FP8 training is not supported by megapre"
    assert refusal in proc.stderr, proc.stderr[-3000:]
    assert str(ROOT / "megapre") not in proc.stderr  # no traceback from megapre's code
    assert "iteration" not in proc.stdout and not (tmp_path / "ckpt").exists()
