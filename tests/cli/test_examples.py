"""The example scripts: every one parses (`bash -n`), the single-node launchers refuse a missing
dataset with a message naming the variable, and the quickstart runs end to end at a tiny size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA, write_counting_corpus

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SCRIPTS = ["quickstart.sh", "pretrain_gpt.sh", "pretrain_bert.sh", "slurm_multinode.sbatch",
           "shakespeare_char.sh", "finetune_sst2.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses(name):
    path = EXAMPLES / name
    assert path.is_file(), f"{path} is missing"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "set -euo pipefail" in path.read_text()


def test_readme_explains_every_script():
    text = (EXAMPLES / "README.md").read_text()
    for name in SCRIPTS:
        assert name in text, f"examples/README.md does not mention {name}"


@pytest.mark.parametrize("name", ["pretrain_gpt.sh", "pretrain_bert.sh", "slurm_multinode.sbatch"])
def test_missing_data_path_is_named(name, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATA_PATH"}
    env["SLURM_SUBMIT_DIR"] = str(ROOT)
    proc = subprocess.run(["bash", str(EXAMPLES / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DATA_PATH" in proc.stderr, proc.stderr


def test_shakespeare_missing_text_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    proc = subprocess.run(["bash", str(EXAMPLES / "shakespeare_char.sh"), str(missing),
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert str(missing) in proc.stderr and "not found" in proc.stderr


@pytest.mark.parametrize("script,env", [
    ("quickstart.sh", {"QUICKSTART_STEPS": "ten"}),
    ("quickstart.sh", {"QUICKSTART_STEPS": "ten", "QUICKSTART_TINY": "1"}),
    ("quickstart.sh", {"QUICKSTART_TP": "0"}),
    ("shakespeare_char.sh", {"SHAKESPEARE_ITERS": "50"}),
    ("finetune_sst2.sh", {"EPOCHS": "two"}),
    ("finetune_sst2.sh", {"LORA_RANK": "-4"}),
])
def test_bad_settings_are_named_before_any_work(script, env, tmp_path):
    # shakespeare_char.sh gets a text that exists (this file) so only the setting can be wrong,
    # also where ../shared/data is absent
    text = [str(Path(__file__).resolve())] if script == "shakespeare_char.sh" else []
    proc = subprocess.run(["bash", str(EXAMPLES / script), *text], cwd=tmp_path,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    name = next(iter(env))
    assert name in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing installed


@pytest.mark.slow
def test_pretrain_gpt_script_trains_on_cpu(tmp_path):
    """pretrain_gpt.sh as written (GPT-2 tokenizer, bf16, checkpoints), shrunk by trailing flags:
    two CPU processes with TP=2 train, save, and log."""
    gpt2 = SHARED_DATA / "gpt2"
    if not (gpt2 / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {gpt2} (the shared data directory)")
    prefix = write_counting_corpus(tmp_path / "count_text_document", docs=200, eod=50256)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DATA_PATH": prefix,
           "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "GPUS": "2", "TP": "2", "DEVICE": "cpu",
           "VOCAB_FILE": str(gpt2 / "vocab.json"), "MERGE_FILE": str(gpt2 / "merges.txt")}
    tiny = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "4", "--lr-warmup-iters", "1",
            "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "2",
            "--save-interval", "4", "--num-workers", "0", "--split", "90,5,5",
            "--data-cache-path", str(tmp_path / "cache")]
    proc = subprocess.run(["bash", str(EXAMPLES / "pretrain_gpt.sh"), *tiny], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r.get("split", "train")) for r in rows] == [
        (2, "train"), (4, "train"), (4, "valid"), (4, "test")]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


@pytest.mark.slow
def test_pretrain_bert_script_trains_on_cpu(tmp_path):
    """pretrain_bert.sh as written (WordPiece, masked LM + sentence order, bf16, checkpoints),
    shrunk by trailing flags, on sentence-split Shakespeare: two CPU processes with TP=2."""
    data = SHARED_DATA
    vocab, text = data / "bert" / "vocab.txt", data / "tinyshakespeare.txt"
    if not (vocab.is_file() and text.is_file()):
        pytest.skip(f"BERT vocab.txt or tinyshakespeare.txt not found in {data}")
    src = tmp_path / "plays.txt"
    src.write_text(text.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    prep = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src),
         "--text-mode", "blank-line", "--split-sentences", "--tokenizer-type",
         "BertWordPieceLowerCase", "--vocab-file", str(vocab), "--output-prefix",
         str(tmp_path / "plays"), "--workers", "1"], env=env, capture_output=True, text=True,
        timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    env.update(DATA_PATH=str(tmp_path / "plays_text_sentence"), VOCAB_FILE=str(vocab),
               CHECKPOINT_DIR=str(tmp_path / "ckpt"), GPUS="2", TP="2", DEVICE="cpu")
    tiny = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "4", "--lr-warmup-iters", "1",
            "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "2",
            "--save-interval", "4", "--num-workers", "0", "--split", "80,10,10",
            "--data-cache-path", str(tmp_path / "cache")]
    proc = subprocess.run(["bash", str(EXAMPLES / "pretrain_bert.sh"), *tiny], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r.get("split", "train")) for r in rows] == [
        (2, "train"), (4, "train"), (4, "valid"), (4, "test")]
    assert all(0 < r["loss"] < 20 for r in rows)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


@pytest.mark.slow
def test_quickstart_tiny_runs_end_to_end(tmp_path):
    """Corpus -> tokenizer -> dataset -> TP2 torchrun training -> evaluate -> generate -> summary,
    with the installed environment (no pip) and this checkout's megapre."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QUICKSTART_TINY": "1",
           "QUICKSTART_STEPS": "10", "QUICKSTART_SKIP_INSTALL": "1", "OMP_NUM_THREADS": "1"}
    work = tmp_path / "qs"
    proc = subprocess.run(["bash", str(EXAMPLES / "quickstart.sh"), str(work)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for n in range(1, 8):
        assert f"[quickstart {n}/7" in out
    assert "[quickstart] summary" in out and "train loss" in out and "tokens/s" in out
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    assert train[-1]["iteration"] == 10 and train[-1]["loss"] < train[0]["loss"]
    assert any(r.get("split") == "valid" for r in rows)
    assert (work / "data-bpe1000" / "demo_text_document.idx").is_file()
    ev = json.loads((work / "run" / "eval.json").read_text())
    assert ev["iteration"] == 10 and ev["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert ev["loss"] == pytest.approx(ev["lm_loss"]) and ev["loss"] < 10
    sample = json.loads((work / "run" / "sample.json").read_text())["samples"][0]
    assert sample["prompt"] == "The function returns" and sample["ids"]
    assert "  sample " in out and "  evaluate " in out


@pytest.mark.slow
def test_finetune_sst2_tiny_runs_end_to_end(tmp_path):
    """Books -> WordPiece vocabulary -> sentence dataset -> BERT pretraining -> SST-2 fine-tuning
    -> report -> evaluate, on slices of the shared data; then LoRA on the same pretrained model."""
    for name in ("gutenberg/gutenberg_en_24MiB.txt", "sst2/train.tsv", "sst2/test.tsv"):
        if not (SHARED_DATA / name).is_file():
            pytest.skip(f"{SHARED_DATA / name} is absent")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TINY": "1", "EPOCHS": "1",
           "DATA_DIR": str(SHARED_DATA), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "run"
    proc = subprocess.run(["bash", str(EXAMPLES / "finetune_sst2.sh"), str(work)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SST-2 dev accuracy" in proc.stdout
    report = json.loads((work / "sst2" / "report.json").read_text())
    assert set(report) == {"valid", "test"} and report["test"]["examples"] == 399
    lora = subprocess.run(["bash", str(EXAMPLES / "finetune_sst2.sh"), str(work)],
                          env={**env, "PRETRAINED": str(work / "bert"), "LORA_RANK": "4"},
                          capture_output=True, text=True, timeout=900)
    assert lora.returncode == 0, lora.stdout[-2000:] + lora.stderr[-3000:]
    assert "LoRA:" in lora.stdout and (work / "sst2-lora4" / "report.json").is_file()
