"""An int8 checkpoint (megapre.compress) serves as a distillation teacher: the student's losses
with the weight-int8 teacher are close to those with the float teacher, and at TP2 equal one
process's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_gpt_flags
from conftest import train_in_process as _train
from megapre.parallel.testing import run_distributed
from quant_cases import counting_case, quantize

KD = ("--kd-alpha", "0.3", "--kd-temperature", "2")


def _worker(rank: int, world: int, flags: list[str]) -> None:
    _train(flags)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r]


def _student(case: dict, teacher: str, out: Path, *extra: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return tiny_gpt_flags(case["corpus"], out, "--teacher-checkpoint", teacher, *KD, *extra)


@pytest.mark.slow
def test_int8_teacher(tmp_path):
    (tmp_path / "case").mkdir()
    case = counting_case(tmp_path / "case")
    teacher = tmp_path / "int8"
    quantize(case, teacher, "weight-int8", "--quantize-lm-head")
    _train(_student(case, case["ckpt"], tmp_path / "float"))
    _train(_student(case, str(teacher), tmp_path / "one"))
    run_distributed(_worker, 2, _student(case, str(teacher), tmp_path / "tp2",
                                         "--tensor-model-parallel-size", "2"), timeout_s=300)
    want, one, tp2 = (_losses(tmp_path / n) for n in ("float", "one", "tp2"))
    assert len(one) == len(want) == len(tp2) == 3
    assert one == pytest.approx(want, rel=1e-2)
    assert tp2 == pytest.approx(one, rel=1e-5)
