"""Shared pieces of the fine-tuning CLI tests: a tiny pretrained BERT and a keyword sentiment
task (a sentence is positive iff it holds a positive word) it learns in a few epochs."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import bert_args, write_bert_corpus

POS = "good great fine lovely superb nice".split()
NEG = "bad awful poor boring dull ugly".split()
FILL = "the movie was a and story plot actor film it is very".split()


def write_task(path: Path, rows: int, seed: int, header: str = "sentence\tlabel") -> Path:
    rng = random.Random(seed)
    lines = [header]
    for _ in range(rows):
        y = rng.randint(0, 1)
        words = rng.choices(FILL, k=rng.randint(2, 10)) + [rng.choice(POS if y else NEG)]
        rng.shuffle(words)
        lines.append(" ".join(words) + "\t" + ("positive" if y else "negative"))
    path.write_text("\n".join(lines) + "\n")
    return path


def pretrain(directory: Path, seed: int) -> Path:
    from megapre.cli.flags import parse_config
    from megapre.train.loop import Trainer

    directory.mkdir(parents=True, exist_ok=True)
    corpus = write_bert_corpus(directory)
    save = directory / "pre"
    cfg = parse_config(bert_args(corpus, directory / "cache") +
                       ["--save", str(save), "--seed", str(seed)])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return save


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    return {"dir": d, "pre": pretrain(d, 1234), "train": write_task(d / "train.tsv", 160, 1),
            "valid": write_task(d / "valid.tsv", 40, 2), "test": write_task(d / "test.tsv", 48, 3)}


def flags(task, out: Path, *extra: str) -> list[str]:
    return ["--pretrained-checkpoint", str(task["pre"]), "--train-data", str(task["train"]),
            "--valid-data", str(task["valid"]), "--test-data", str(task["test"]),
            "--micro-batch-size", "8", "--lr", "1e-3", "--lr-warmup-fraction", "0",
            "--device", "cpu", "--save", str(out),
            "--metrics-path", str(out / "metrics.jsonl"), "--log-interval", "1",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--classifier-dropout", "0",
            *extra]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


