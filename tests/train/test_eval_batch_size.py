"""--eval-global-batch-size (Megatron's flag): validation batches of their own size. One batch
of 16 samples gives the same validation loss as two batches of 8 over the same samples, the
split is sized for it, and a size the layout cannot split is an error naming the flag."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_gpt_flags, write_counting_corpus
from megapre.cli.flags import parse_config
from megapre.data.split import samples_per_split
from megapre.model.config import ConfigError
from megapre.train.args import validate
from megapre.train.data import samples_per_split as run_samples

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_counting_corpus(str(tmp_path_factory.mktemp("corpus") / "count_text_document"))


def _args(corpus: str, work: Path, *extra: str) -> list[str]:
    return tiny_gpt_flags(corpus, work, *extra, global_batch_size=8, eval_interval=3,
                          split="80,10,10")


def _evals(work: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    return {r["split"]: r["loss"] for r in rows if "split" in r}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "megapre.pretrain", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_one_batch_of_16_equals_two_of_8(corpus, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    p2 = _run(_args(corpus, two, "--eval-iters", "2"), tmp_path)
    p1 = _run(_args(corpus, one, "--eval-iters", "1", "--eval-global-batch-size", "16"), tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert p1.returncode == 0, p1.stderr[-3000:]
    e2, e1 = _evals(two), _evals(one)
    assert e1.keys() == e2.keys() == {"valid", "test"}
    for split in e1:  # every sample has 32 predicted tokens: the means of means agree
        assert e1[split] == pytest.approx(e2[split], rel=1e-6)


def test_the_split_is_sized_for_the_eval_batch(corpus, tmp_path):
    cfg = parse_config(_args(corpus, tmp_path, "--eval-iters", "4",
                             "--eval-global-batch-size", "24"))
    assert run_samples(cfg) == [3 * 8, (3 // 3 + 1) * 4 * 24, 4 * 24]
    assert samples_per_split(10, 5, 2, 8) == [80, 48, 16]


@pytest.mark.parametrize("value,needle", [("12", "not divisible by --micro-batch-size 2 x "
                                                  "data-parallel size 4 = 8"),
                                          ("0", "--eval-global-batch-size")])
def test_sizes_the_layout_cannot_split_are_refused(corpus, tmp_path, value, needle):
    cfg = parse_config(_args(corpus, tmp_path, "--eval-global-batch-size", value))
    with pytest.raises(ConfigError, match=needle):
        validate(cfg, world_size=4)
