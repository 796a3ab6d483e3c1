"""megapre.finetune end to end on a tiny pretrained BERT and a keyword sentiment task: it learns,
reports (console, metrics JSONL, report.json, predictions), resumes exactly, saves LoRA adapters
alone and merges them, and `megapre.evaluate --task-data` reproduces the run's test report. Bad
input is one line and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_cases import flags, pretrain, records, task  # noqa: F401 (fixture)
from megapre.cli import evaluate as evaluate_cli
from megapre.cli import finetune as finetune_cli

def test_finetune_learns_reports_and_evaluate_agrees(task, tmp_path, capfd):
    out = tmp_path / "ft"
    preds = tmp_path / "pred.tsv"
    assert finetune_cli.main(flags(task, out, "--epochs", "8", "--predictions-path",
                                   str(preds))) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["test"]["accuracy"] >= 0.9 and report["test"]["examples"] == 48
    assert report["test"]["names"] == ["negative", "positive"]
    assert sum(map(sum, report["test"]["confusion_matrix"])) == 48
    evals = [r for r in records(out / "metrics.jsonl") if r.get("split")]
    assert [r["split"] for r in evals] == ["valid"] * 8 + ["test"]
    assert evals[-2]["accuracy"] > evals[0]["accuracy"]
    lines = preds.read_text().splitlines()
    assert len(lines) == 49 and lines[1].startswith(f"{task['test']}:2\t")
    shown = capfd.readouterr().out
    assert "confusion matrix" in shown and "macro-F1" in shown

    assert evaluate_cli.main(["--load", str(out), "--task-data", str(task["test"]),
                              "--device", "cpu", "--output-json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["accuracy"] == report["test"]["accuracy"]
    assert again["confusion_matrix"] == report["test"]["confusion_matrix"]
    assert again["loss"] == pytest.approx(report["test"]["loss"], rel=1e-6)


def test_resume_continues_exactly(task, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["--train-iters", "16", "--hidden-dropout", "0.1", "--classifier-dropout", "0.1"]
    assert finetune_cli.main(flags(task, whole, *common)) == 0
    assert finetune_cli.main(flags(task, split, *common, "--exit-interval", "8")) == 0
    assert (split / "iter_0000008").is_dir() and not (split / "iter_0000016").exists()
    assert finetune_cli.main(["--load", str(split), "--device", "cpu"]) == 0
    a = {r["iteration"]: r["loss"] for r in records(whole / "metrics.jsonl") if "lr" in r}
    b = {r["iteration"]: r["loss"] for r in records(split / "metrics.jsonl") if "lr" in r}
    assert sorted(b) == list(range(1, 17))
    for it in range(1, 17):
        assert b[it] == pytest.approx(a[it], rel=1e-6), it


def _model_keys(ckpt: Path) -> set[str]:
    from megapre.train.checkpoint import SafeFileSystemReader, resolve_checkpoint

    meta = SafeFileSystemReader(resolve_checkpoint(ckpt)).read_metadata()
    return {k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")}


def test_lora_saves_adapters_alone_and_merges(task, tmp_path, capfd):
    out, merged = tmp_path / "lora", tmp_path / "merged"
    assert finetune_cli.main(flags(task, out, "--epochs", "2", "--lora-rank", "2",
                                   "--lora-alpha", "4")) == 0
    shown = capfd.readouterr().out
    assert "LoRA:" in shown
    fraction = float(shown.split("LoRA:")[1].split("(")[1].split("%")[0])
    assert fraction <= 2.0
    keys = _model_keys(out)
    assert keys and all(".lora_" in k or k.startswith("heads.") for k in keys)
    assert any(".lora_a" in k for k in keys)
    assert finetune_cli.main(["merge-lora", "--load", str(out), "--save", str(merged),
                              "--device", "cpu"]) == 0
    assert not any(".lora_" in k for k in _model_keys(merged))
    got = []
    for ckpt in (out, merged):
        js = tmp_path / f"{ckpt.name}.json"
        assert evaluate_cli.main(["--load", str(ckpt), "--task-data", str(task["test"]),
                                  "--device", "cpu", "--output-json", str(js)]) == 0
        got.append(json.loads(js.read_text()))
    assert got[0]["confusion_matrix"] == got[1]["confusion_matrix"]
    assert got[0]["loss"] == pytest.approx(got[1]["loss"], rel=1e-5)


def test_lora_adapters_refuse_another_base(task, tmp_path, capsys):
    out = tmp_path / "lora"
    assert finetune_cli.main(flags(task, out, "--train-iters", "2", "--lora-rank", "2")) == 0
    other = pretrain(tmp_path / "other", seed=99)  # same architecture, other weights
    capsys.readouterr()
    rc = evaluate_cli.main(["--load", str(out), "--task-data", str(task["test"]), "--device",
                            "cpu"])
    assert rc == 0
    rc = finetune_cli.main(["merge-lora", "--load", str(out), "--save", str(tmp_path / "m"),
                            "--pretrained-checkpoint", str(other), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "other base weights" in err[0]


def _one_line_error(capsys, rc: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]


def test_bad_input_is_one_line(task, tmp_path, capsys):
    d = tmp_path
    base = flags(task, d / "x", "--train-iters", "1")
    # a training label not in --label-names
    _one_line_error(capsys, finetune_cli.main(base + ["--label-names", "negative", "neutral"]),
                    "positive", f"{task['train']}:", "--label-names")
    # a test label the training data never had
    bad_test = d / "test.tsv"
    bad_test.write_text("sentence\tlabel\nfine film\tmixed\n")
    _one_line_error(capsys, finetune_cli.main(base + ["--test-data", str(bad_test)]),
                    "mixed", f"{bad_test}:2")
    # a missing column
    _one_line_error(capsys, finetune_cli.main(base + ["--text-key", "review"]),
                    "review", "--text-key")
    # not TSV/CSV/JSONL
    txt = d / "train.txt"
    txt.write_text("hello\n")
    _one_line_error(capsys, finetune_cli.main(base + ["--train-data", str(txt)]), str(txt))
    # no pretrained checkpoint
    _one_line_error(capsys, finetune_cli.main(["--train-data", str(task["train"])]),
                    "--pretrained-checkpoint")


def test_resume_with_other_labels_is_refused(task, tmp_path, capsys):
    out = tmp_path / "ft"
    assert finetune_cli.main(flags(task, out, "--train-iters", "2", "--exit-interval", "1")) == 0
    capsys.readouterr()
    four = tmp_path / "four.tsv"
    four.write_text("sentence\tlabel\n" + "".join(f"w{i}\t{c}\n" for i, c in
                                                 enumerate("abcdabcd")))
    rc = finetune_cli.main(["--load", str(out), "--train-data", str(four), "--device", "cpu"])
    _one_line_error(capsys, rc, "not one of the training labels")
    rc = finetune_cli.main(["--load", str(out), "--label-names", "a", "b", "c", "d",
                            "--device", "cpu"])
    _one_line_error(capsys, rc, "--label-names")
