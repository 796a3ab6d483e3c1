"""A model that came in through the Hugging Face door fine-tunes on a labelled task like one
pretrained here: megapre.finetune from an hf-import checkpoint, under TP2 with two gloo ranks,
learns the task and reports, and its first step's loss is the single-process run's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cli"))

from finetune_cases import write_task  # noqa: E402
from hf_cases import hf_dir  # noqa: E402
from megapre.cli.convert import main as convert  # noqa: E402


def _finetune(ckpt: Path, data: Path, out: Path, tp: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(tp), "-m", "megapre.finetune", "--pretrained-checkpoint", str(ckpt),
           "--train-data", str(data / "train.tsv"), "--valid-data", str(data / "valid.tsv"),
           "--test-data", str(data / "valid.tsv"), "--tensor-model-parallel-size", str(tp),
           "--pooling", "mean", "--epochs", "4", "--micro-batch-size", "8", "--lr", "2e-3",
           "--lr-warmup-fraction", "0", "--device", "cpu", "--save", str(out),
           "--hidden-dropout", "0", "--attention-dropout", "0", "--classifier-dropout", "0",
           "--metrics-path", str(out / "metrics.jsonl"), "--log-interval", "1"]
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]


@pytest.mark.slow
def test_imported_gpt2_finetunes_under_tp2(tmp_path):
    hf_dir("gpt2", tmp_path / "hf")
    assert convert(["hf-import", "--hf-dir", str(tmp_path / "hf"), "--save",
                    str(tmp_path / "ck")]) == 0
    write_task(tmp_path / "train.tsv", 96, 1)
    write_task(tmp_path / "valid.tsv", 32, 2)
    tp2 = _finetune(tmp_path / "ck", tmp_path, tmp_path / "ft2", 2)
    tp1 = _finetune(tmp_path / "ck", tmp_path, tmp_path / "ft1", 1)
    train = [r for r in tp2 if "loss" in r and r.get("split") is None]
    assert train, tp2[:3]
    first1 = next(r for r in tp1 if "loss" in r and r.get("split") is None)
    assert abs(train[0]["loss"] - first1["loss"]) < 1e-5 * max(1.0, abs(first1["loss"]))
    valid = [r for r in tp2 if r.get("split") == "valid"]
    assert len(valid) == 4 and valid[-1]["loss"] < valid[0]["loss"]
    report = json.loads((tmp_path / "ft2" / "report.json").read_text())["test"]
    assert report["examples"] == 32 and report["accuracy"] > 0.6
