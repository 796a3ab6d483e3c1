"""A fine-tuned GPT (regression head, and the same run with LoRA adapters) quantizes to
weight-int8: the adapters are merged first, the head stays float, and megapre.evaluate
--task-data scores the int8 checkpoint about as the float one; smoothquant is refused."""
from __future__ import annotations

import json

import pytest

from cli.test_finetune_gpt import _pretrain, _rows
from megapre.cli import finetune as finetune_cli


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("task")
    pre = _pretrain(work)
    (work / "train.jsonl").write_text("\n".join(_rows(96, 1)) + "\n")
    (work / "test.jsonl").write_text("\n".join(_rows(32, 2)) + "\n")
    out = {}
    for name, extra in (("full", []), ("lora", ["--lora-rank", "4"])):
        save = work / name
        assert finetune_cli.main([
            "--pretrained-checkpoint", str(pre), "--train-data", str(work / "train.jsonl"),
            "--text-key", "q", "--text-pair-key", "d", "--label-key", "score",
            "--num-classes", "1", "--pooling", "mean", "--epochs", "2", "--micro-batch-size",
            "8", "--lr", "2e-3", "--device", "cpu", "--save", str(save), *extra]) == 0
        out[name] = save
    return {"work": work, "test": work / "test.jsonl", **out}


def _score(ckpt, test, out_json) -> dict:
    from megapre.cli.evaluate import main

    assert main(["--load", str(ckpt), "--task-data", str(test), "--output-json",
                 str(out_json)]) == 0
    return json.loads(out_json.read_text())


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fine_tuned_weight_int8(tuned, tmp_path, kind):
    from megapre.cli.compress import main

    out = tmp_path / "q"
    assert main(["quantize", "--load", str(tuned[kind]), "--method", "weight-int8", "--save",
                 str(out), "--output-json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["fine_tuned"] and summary["quantized_layers"] == 8
    float_report = _score(tuned[kind], tuned["test"], tmp_path / "f.json")
    int8_report = _score(out, tuned["test"], tmp_path / "i.json")
    print(kind, "mse float", float_report["mse"], "int8", int8_report["mse"])
    assert int8_report["examples"] == float_report["examples"] == 32
    assert int8_report["mse"] == pytest.approx(float_report["mse"], rel=0.05, abs=1e-3)


def test_fine_tuned_refuses_calibration(tuned, tmp_path, capsys):
    from megapre.cli.compress import main

    assert main(["quantize", "--load", str(tuned["full"]), "--method", "smoothquant",
                 "--calib-data", "x", "--save", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fine-tuned" in err[0]
    assert not (tmp_path / "q").exists()
