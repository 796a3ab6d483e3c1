"""`torchrun -m megapre.finetune` in DP2, PP2 and TP2 gives the single process's run: the same
training losses step by step and the same test report (predictions gathered over data-parallel
ranks into file order, reported from the last pipeline stage)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_cases import flags, records, task  # noqa: F401 (fixture)
from megapre.cli import finetune as finetune_cli

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = {"dp2": [], "pp2": ["--pipeline-model-parallel-size", "2"],
           "tp2": ["--tensor-model-parallel-size", "2"]}
STEPS = ["--train-iters", "6", "--global-batch-size", "8", "--micro-batch-size", "4"]


@pytest.fixture(scope="module")
def single(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "ft"
    assert finetune_cli.main(flags(task, out, *STEPS, "--predictions-path",
                                   str(out.parent / "pred.tsv"))) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_torchrun_layout_equals_single_process(layout, task, single, tmp_path):
    out = tmp_path / "ft"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "megapre.finetune",
           *flags(task, out, *STEPS, *LAYOUTS[layout], "--predictions-path",
                  str(tmp_path / "pred.tsv"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {r["iteration"]: r for r in records(single / "metrics.jsonl") if "lr" in r}
    got = {r["iteration"]: r for r in records(out / "metrics.jsonl") if "lr" in r}
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for it in want:
        assert got[it]["loss"] == pytest.approx(want[it]["loss"], rel=1e-5), it
    a = json.loads((single / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    for split in ("valid", "test"):
        assert b[split]["confusion_matrix"] == a[split]["confusion_matrix"]
        assert b[split]["examples"] == a[split]["examples"]
        assert b[split]["loss"] == pytest.approx(a[split]["loss"], rel=1e-5)
    assert (tmp_path / "pred.tsv").read_text().splitlines()[0] == \
        (single.parent / "pred.tsv").read_text().splitlines()[0]
    assert len((tmp_path / "pred.tsv").read_text().splitlines()) == 49


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_evaluate_task_data_in_another_layout(layout, task, single, tmp_path):
    """The single-process fine-tuned checkpoint scored by `torchrun -m megapre.evaluate
    --task-data` in another layout gives the run's own test report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "megapre.evaluate", "--load", str(single), "--task-data",
           str(task["test"]), "--device", "cpu", "--output-json", str(out), *LAYOUTS[layout]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    want = json.loads((single / "report.json").read_text())["test"]
    assert got["layout"][layout[:2]] == 2
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert "confusion matrix" in proc.stdout
