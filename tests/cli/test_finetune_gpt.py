"""Fine-tuning a GPT from the command line: a regression task over sentence pairs in JSONL, pooled
by the mean of the real tokens, reports MSE and correlations and gets better with training."""
from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import COUNTING_VOCAB, write_counting_corpus
from megapre.cli import finetune as finetune_cli


def _pretrain(tmp: Path) -> Path:
    from megapre.cli.flags import parse_config
    from megapre.train.loop import Trainer

    corpus = write_counting_corpus(str(tmp / "count_text_document"))
    cfg = parse_config(["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
                        "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size",
                        "4", "--train-iters", "2", "--eval-iters", "0", "--data-path", corpus,
                        "--tokenizer-type", "NullTokenizer", "--vocab-size",
                        str(COUNTING_VOCAB - 1), "--make-vocab-size-divisible-by", "8",
                        "--num-workers", "0", "--device", "cpu", "--save", str(tmp / "pre"),
                        "--data-cache-path", str(tmp / "cache")])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return tmp / "pre"


def _rows(n: int, seed: int) -> list[str]:
    """Target: the share of ids >= 20 over both texts (a smooth function of the tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = [rng.randrange(39) for _ in range(rng.randint(2, 9))]
        b = [rng.randrange(39) for _ in range(rng.randint(1, 6))]
        y = sum(t >= 20 for t in a + b) / len(a + b)
        out.append(json.dumps({"q": " ".join(map(str, a)), "d": " ".join(map(str, b)),
                               "score": round(y, 4)}))
    return out


def test_gpt_regression_on_pairs(tmp_path):
    pre = _pretrain(tmp_path)
    (tmp_path / "train.jsonl").write_text("\n".join(_rows(192, 1)) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(_rows(48, 2)) + "\n")
    out = tmp_path / "ft"
    rc = finetune_cli.main([
        "--pretrained-checkpoint", str(pre), "--train-data", str(tmp_path / "train.jsonl"),
        "--valid-data", str(tmp_path / "test.jsonl"), "--test-data", str(tmp_path / "test.jsonl"),
        "--text-key", "q", "--text-pair-key", "d", "--label-key", "score", "--num-classes", "1",
        "--pooling", "mean", "--epochs", "6", "--micro-batch-size", "8", "--lr", "2e-3",
        "--lr-warmup-fraction", "0", "--device", "cpu", "--save", str(out), "--metrics-path",
        str(out / "metrics.jsonl"), "--predictions-path", str(tmp_path / "pred.tsv")])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())["test"]
    assert report["task"] == "regression" and report["examples"] == 48
    valid = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"split": "valid"' in x]
    assert len(valid) == 6 and valid[-1]["mse"] < 0.7 * valid[0]["mse"]
    assert report["pearson"] > 0.5
    lines = (tmp_path / "pred.tsv").read_text().splitlines()
    assert lines[0] == "source\tprediction" and len(lines) == 49


def test_gpt_rejects_cls_pooling(tmp_path, capsys):
    pre = _pretrain(tmp_path)
    (tmp_path / "train.jsonl").write_text("\n".join(_rows(16, 1)) + "\n")
    rc = finetune_cli.main(["--pretrained-checkpoint", str(pre), "--train-data",
                            str(tmp_path / "train.jsonl"), "--text-key", "q", "--label-key",
                            "score", "--num-classes", "1", "--pooling", "cls", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--pooling cls" in err[0]
