"""megapre.evaluate and megapre.generate end to end: a short `megapre.pretrain --save` run, then
both CLIs on its checkpoint (one process and torchrun TP2), their JSON output, and bad input
(exit 2, one line naming the flag or file, no traceback)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import COUNTING_VOCAB as VOCAB
from conftest import bert_args, write_bert_corpus, write_counting_corpus

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("megapre.train.checkpoint", reason="checkpoints (megapre.train.checkpoint) "
                    "are not in this tree yet")


def _run(args: list[str], cwd: Path, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable] if not torchrun else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(torchrun)]
    return subprocess.run([*launcher, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 30-step GPT run on counting sequences, saved at the end (validation and test logged)."""
    work = tmp_path_factory.mktemp("run")
    corpus = write_counting_corpus(str(work / "count_text_document"))
    proc = _run(["megapre.pretrain", "--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
                 "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
                 "--global-batch-size", "8", "--train-iters", "30", "--lr", "3e-3",
                 "--lr-warmup-iters", "3", "--hidden-dropout", "0", "--attention-dropout", "0",
                 "--eval-interval", "30", "--eval-iters", "2", "--log-interval", "10",
                 "--data-path", corpus, "--split", "90,5,5", "--tokenizer-type", "NullTokenizer",
                 "--vocab-size", str(VOCAB - 1), "--make-vocab-size-divisible-by", "8",
                 "--num-workers", "0", "--device", "cpu", "--save", str(work / "ckpt"),
                 "--metrics-path", str(work / "metrics.jsonl")], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    losses = {r["split"]: r["loss"] for r in rows if "split" in r}
    return {"dir": work, "ckpt": str(work / "ckpt"), "corpus": corpus, **losses}


def _main(prog: str, args: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI's main() in this process (as `python -m prog` would): (exit code, out, err)."""
    import importlib

    code = importlib.import_module(prog).main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _json_line(code: int, out: str, err: str) -> dict:
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_evaluate_reproduces_the_runs_validation_and_test(run, capsys):
    for split in ("valid", "test"):
        out = run["dir"] / f"{split}.json"
        got = _json_line(*_main("megapre.evaluate", ["--load", run["ckpt"], "--eval-split", split,
                                                     "--eval-iters", "2", "--output-json",
                                                     str(out)], capsys))
        assert got["batch_mean_loss"] == pytest.approx(run[split], rel=1e-9), split
        assert got["loss"] == pytest.approx(run[split], rel=1e-6)
        assert got["tokens"] == 2 * 8 * 32 and got["iteration"] == 30 and got["split"] == split
        assert json.loads(out.read_text()) == got


def test_evaluate_whole_dataset(run, capsys):
    got = _json_line(*_main("megapre.evaluate", ["--load", run["ckpt"], "--data-path",
                                                 run["corpus"], "--micro-batch-size", "16"], capsys))
    assert got["split"] == "all" and got["global_batch_size"] == 16
    assert got["batches"] == got["dataset_samples"] // 16 and got["tokens"] == got["samples"] * 32
    assert got["ppl"] == pytest.approx(2.718281828 ** got["loss"], rel=1e-6)
    assert got["loss"] < 3.0  # trained: well below ln(40) = 3.69 of a uniform guess


def test_generate_greedy_sampled_and_json(run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("3 5 7 9") + "\n" + json.dumps({"prompt": "10 11"}) + "\n")
    out = tmp_path / "gen.json"
    code, stdout, err = _main("megapre.generate", [
        "--load", run["ckpt"], "--prompt-file", str(prompts), "--greedy", "--max-new-tokens", "8",
        "--output-json", str(out)], capsys)
    assert code == 0, err
    samples = json.loads(out.read_text())["samples"]
    assert [s["prompt_ids"] for s in samples] == [[3, 5, 7, 9], [10, 11]]
    for s in samples:
        assert len(s["ids"]) == 8 and all(0 <= i < VOCAB for i in s["ids"])
        assert s["text"] == " ".join(map(str, s["ids"]))
        assert " ".join(map(str, s["prompt_ids"] + s["ids"])) in stdout
    assert samples[0]["ids"][:2] == [11, 13]  # it learned to count (step 2 from 3 5 7 9)
    sampled = []
    for seed, cache in ((1, []), (1, ["--no-kv-cache"]), (2, [])):
        code, _, err = _main("megapre.generate", [
            "--load", run["ckpt"], "--prompt", "3 5", "--top-k", "5", "--top-p", "0.9",
            "--temperature", "1.2", "--seed", str(seed), "--max-new-tokens", "10",
            "--ignore-eod", "--output-json", str(out), *cache], capsys)
        assert code == 0, err
        sampled.append(json.loads(out.read_text())["samples"][0]["ids"])
    assert sampled[0] == sampled[1] != sampled[2]


def test_evaluate_bert_checkpoint(tmp_path, capsys):
    """A BERT checkpoint: masked-LM + sentence-order loss and accuracy, equal to scoring the
    saved model in this process; megapre.generate refuses it."""
    import torch

    from megapre.inference.eval_data import eval_dataset, select_data
    from megapre.train.runtime import build_runtime
    from megapre.inference.scoring import score
    from megapre.cli.flags import parse_config
    from megapre.train.args import validate
    from megapre.train.checkpoint import save_checkpoint
    from megapre.train.data import batches
    from megapre.train.step import EvalStep
    from megapre.train.step import StepConfig

    cfg = parse_config(bert_args(write_bert_corpus(tmp_path), tmp_path / "cache"))
    rt = build_runtime(cfg)
    cfg = validate(cfg, 1, rt.tokenizer.vocab_size).config
    with torch.no_grad():  # a sentence-order head that predicts both classes
        rt.model.models[0].heads.binary.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ckpt", 5, rt.model, config=cfg.to_dict(), tracker=rt.tracker)
    dataset = eval_dataset(cfg, rt.tokenizer, select_data(cfg, None, None, "valid"), 8)
    want = score(rt.model, EvalStep(rt.model, StepConfig(2, 4)),
                 batches(dataset, 0, cfg, 0, 1, rt.device, num_workers=0), 2, 4)
    got = _json_line(*_main("megapre.evaluate", ["--load", str(tmp_path / "ckpt"),
                                                 "--eval-iters", "2"], capsys))
    assert got["model"] == "bert" and got["iteration"] == 5
    for key in ("loss", "lm_loss", "sop_loss", "sop_accuracy", "tokens"):
        assert got[key] == pytest.approx(getattr(want, key), rel=1e-6), key
    code, _, err = _main("megapre.generate", ["--load", str(tmp_path / "ckpt"), "--prompt", "a"],
                         capsys)
    assert code == 2 and "holds a bert checkpoint" in err


@pytest.mark.slow
def test_torchrun_tp2_generate_and_pp2_evaluate_equal_one_process(run, tmp_path, capsys):
    args = ["--load", run["ckpt"], "--prompt", "3 5 7 9", "--prompt", "10 11", "--greedy",
            "--max-new-tokens", "8", "--output-json"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert _main("megapre.generate", [*args, str(one)], capsys)[0] == 0
    proc = _run(["megapre.generate", *args, str(two), "--tensor-model-parallel-size", "2"],
                run["dir"], torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(two.read_text())["samples"] == json.loads(one.read_text())["samples"]
    proc = _run(["megapre.evaluate", "--load", run["ckpt"], "--eval-iters", "2",
                 "--pipeline-model-parallel-size", "2"], run["dir"], torchrun=2)
    got = _json_line(proc.returncode, proc.stdout, proc.stderr)
    assert got["layout"] == {"tp": 1, "pp": 2, "dp": 1}
    assert got["batch_mean_loss"] == pytest.approx(run["valid"], rel=1e-6)


def test_python_m_entry_exits_2_on_a_missing_checkpoint(tmp_path):
    proc = _run(["megapre.generate", "--load", str(tmp_path / "nope"), "--prompt", "1"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"megapre.generate: error: --load {tmp_path / 'nope'}: no such directory" in proc.stderr


@pytest.mark.parametrize("prog, args, message", [
    ("megapre.evaluate", ["--load", "{dir}/absent"], "--load .*absent: no such directory"),
    ("megapre.evaluate", ["--load", "{dir}"], "no checkpoint found in"),
    ("megapre.generate", ["--load", "{ckpt}"], "--prompt"),
    ("megapre.generate", ["--load", "{ckpt}", "--prompt", " ".join(["1"] * 40)],
     "40 tokens .* 32 positions .*--max-position-embeddings"),
    ("megapre.generate", ["--load", "{ckpt}", "--prompt", "1", "--pipeline-model-parallel-size",
                          "2"], "world size 1 .*--pipeline-model-parallel-size 2"),
    ("megapre.generate", ["--load", "{ckpt}", "--prompt", "1", "--top-p", "0"], "--top-p"),
    ("megapre.generate", ["--load", "{ckpt}", "--prompt-file", "{dir}/none.txt"], "none.txt"),
    ("megapre.evaluate", ["--load", "{ckpt}", "--data-path", "{dir}/missing_text_document"],
     "missing_text_document"),
    ("megapre.evaluate", ["--load", "{ckpt}", "--eval-iters", "zero"], "--eval-iters"),
    ("megapre.evaluate", ["--load", "{ckpt}", "--global-batch-size", "3"], "--global-batch-size 3"),
])
def test_bad_input_exits_2_naming_it(run, prog, args, message, capsys):
    args = [a.format(dir=run["dir"], ckpt=run["ckpt"]) for a in args]
    code, _, err = _main(prog, args, capsys)
    assert code == 2, err
    assert re.search(message, err), err
