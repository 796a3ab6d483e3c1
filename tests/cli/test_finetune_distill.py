"""Knowledge distillation in fine-tuning: a BERT classifier learns from a fine-tuned teacher
classifier of the same task (KL over the classes, weighted like the task loss); TP2 and PP2
give one process's losses; --kd-alpha 1 is plain fine-tuning exactly; a teacher without a matching head is
refused in one line (exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_cases import flags, records, task  # noqa: F401 (fixture)
from megapre.cli import finetune as finetune_cli
from megapre.parallel.testing import run_distributed


@pytest.fixture(scope="module")
def teacher(task):  # noqa: F811
    out = task["dir"] / "teacher_ft"
    assert finetune_cli.main(flags(task, out, "--epochs", "8")) == 0
    return str(out)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out / "metrics.jsonl") if not r.get("split")]


def _kd(task, teacher, out, *extra):  # noqa: F811
    return flags(task, out, "--epochs", "1", "--teacher-checkpoint", teacher,
                 "--kd-temperature", "2", *extra)


def test_distilled_finetune_learns_and_reports(task, teacher, tmp_path):  # noqa: F811
    out = tmp_path / "kd"
    assert finetune_cli.main(_kd(task, teacher, out, "--epochs", "8")) == 0
    train = [r for r in records(out / "metrics.jsonl") if not r.get("split")]
    assert train[-1]["loss"] < train[0]["loss"]
    report = json.loads((out / "report.json").read_text())
    print("distilled test accuracy", report["test"]["accuracy"])
    assert report["test"]["accuracy"] >= 0.8
    # the student's checkpoint is a plain classifier: evaluate opens it without the teacher
    from megapre.cli import evaluate as evaluate_cli
    assert evaluate_cli.main(["--load", str(out), "--task-data", str(task["test"]),
                              "--device", "cpu", "--output-json", str(tmp_path / "e.json")]) == 0


def test_alpha_one_is_plain_finetuning(task, teacher, tmp_path):  # noqa: F811
    assert finetune_cli.main(flags(task, tmp_path / "plain", "--epochs", "1")) == 0
    assert finetune_cli.main(_kd(task, teacher, tmp_path / "kd", "--kd-alpha", "1")) == 0
    assert _losses(tmp_path / "kd") == _losses(tmp_path / "plain")


def _two_ranks(rank: int, world: int, argv: list[str]) -> int:
    return finetune_cli.main(argv)


@pytest.mark.parametrize("layout", [("--tensor-model-parallel-size", "2"),
                                    ("--pipeline-model-parallel-size", "2")], ids=["tp2", "pp2"])
def test_layout_matches_single_process(task, teacher, tmp_path, layout):  # noqa: F811
    # 1F1B over two stages needs two micro-batches per step; the padding PP adds (to
    # --seq-length) changes no loss
    pad = ("--seq-length", "32", "--global-batch-size", "16")
    assert finetune_cli.main(_kd(task, teacher, tmp_path / "one", *pad)) == 0
    argv = _kd(task, teacher, tmp_path / "two", *pad, *layout)
    assert run_distributed(_two_ranks, 2, argv, timeout_s=300) == [0, 0]
    got, want = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(got) == len(want) > 0
    assert got == pytest.approx(want, rel=1e-5)


def test_teacher_without_a_head_is_refused(task, tmp_path, capsys):  # noqa: F811
    argv = _kd(task, str(task["pre"]), tmp_path / "bad")
    assert finetune_cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no classification head" in err[0], err


def test_hidden_weight_is_refused_in_finetuning(task, teacher, tmp_path, capsys):  # noqa: F811
    assert finetune_cli.main(_kd(task, teacher, tmp_path / "bad", "--kd-hidden-weight", "1")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--kd-hidden-weight" in err[0], err
