"""megapre in EleutherAI's lm-evaluation-harness (megapre/inference/lm_eval_model.py,
megapre-lm-eval), offline, with task YAMLs written here over local files and a tiny GPT trained
on WikiText-2 with GPT-2's BPE:
(a) a multiple-choice task over 50 rows of SST-2 (label words " negative" / " positive"): the
    harness's per-choice log-likelihoods and accuracy equal a direct pass of the model over the
    same strings, by the Python route and by the console script;
(b) a rolling-loglikelihood task over a few paragraphs of WikiText-2 test: the harness's word and
    byte perplexity equal `megapre.evaluate --text-file` on a file holding the same text (one
    document, stripped, so the harness's word count re.split(r"\\s+") is str.split());
generate_until against greedy decoding by hand; TP2 and PP2 (gloo) answer like one process; bad
model arguments are refused in one line."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from tiny_checkpoints import gpt2_checkpoint, wikitext_slice

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
pytest.importorskip("megapre.train.checkpoint", reason="checkpoints are not in this tree")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from megapre.inference.lm_eval_model import MegapreLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SST2_TEST = SHARED_DATA / "sst2" / "test.tsv"
QUESTION = "\nQuestion: Is this sentence positive or negative?\nAnswer:"
CHOICES = ["negative", "positive"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return gpt2_checkpoint(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def lm(ckpt):
    model = MegapreLM(load=ckpt, batch_size=8, device="cpu")
    yield model
    model.close()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: datasets and the hub read local files only."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _write_task(directory: Path, config: dict) -> None:
    """A task YAML (JSON is YAML) whose data are local files, cached under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    config["dataset_kwargs"]["cache_dir"] = str(directory / "hf_cache")
    config.setdefault("metadata", {"version": 1.0})
    (directory / f"{config['task']}.yaml").write_text(json.dumps(config, indent=1))


def _local_tasks_only(monkeypatch) -> None:
    """The harness's CLI indexes its thousands of built-in task YAMLs first (~10-30 s here);
    in-process CLI runs skip that (tools/lm_eval.py in a subprocess does the full thing)."""
    import functools

    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(TaskManager, include_defaults=False))


def _results_file(output: Path) -> dict:
    found = sorted(output.rglob("results_*.json"))
    assert found, f"no results_*.json under {output}"
    return json.loads(found[-1].read_text())


# -- (a) multiple choice over SST-2 -------------------------------------------------------------
@pytest.fixture(scope="module")
def sst2_task(tmp_path_factory) -> dict:
    if not SST2_TEST.is_file():
        pytest.skip(f"{SST2_TEST} is absent (shared test data)")
    work = tmp_path_factory.mktemp("sst2")
    with SST2_TEST.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:50]
    data = work / "sst2_50.jsonl"
    data.write_text("".join(json.dumps({"sentence": r["sentence"], "label": int(r["label"])}) + "\n"
                            for r in rows))
    _write_task(work / "tasks", {
        "task": "megapre_test_sst2", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{sentence}}" + QUESTION,
        "doc_to_target": "label", "doc_to_choice": CHOICES, "metric_list": [{"metric": "acc"}]})
    return {"rows": [{"sentence": r["sentence"], "label": int(r["label"])} for r in rows],
            "tasks": work / "tasks", "work": work}


def _direct_loglikelihood(lm: MegapreLM, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and greedy-ness by one plain forward of the GPT."""
    tok, gpt = lm.rt.tokenizer, lm.rt.model.models[0]
    ctx, cont = tok.encode(context), tok.encode(continuation)
    assert tok.encode(context + continuation) == ctx + cont  # the harness's split is the same
    ids = torch.tensor(ctx + cont)
    with torch.no_grad():
        loss = gpt(input_ids=ids[None, :-1], labels=ids[None, 1:])[0]
        logits = gpt.gathered_logits(gpt(input_ids=ids[None, :-1]))[0]
    n = len(cont)
    greedy = bool((logits[-n:].argmax(-1) == ids[-n:]).all())
    return -float(loss[-n:].double().sum()), greedy


def test_multiple_choice_equals_direct_scoring(lm, sst2_task, tmp_path, monkeypatch):
    tasks = TaskManager(include_path=str(sst2_task["tasks"]), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["megapre_test_sst2"], task_manager=tasks,
                                      log_samples=True)
    samples = sorted(results["samples"]["megapre_test_sst2"], key=lambda s: s["doc_id"])
    assert len(samples) == 50
    correct = 0
    for sample, row in zip(samples, sst2_task["rows"]):
        context = row["sentence"] + QUESTION
        assert [tuple(a) for a in sample["arguments"]] == [(context, " " + c) for c in CHOICES]
        want = [_direct_loglikelihood(lm, context, " " + c) for c in CHOICES]
        got = [tuple(r) for r in sample["filtered_resps"]]
        for (ll, greedy), (want_ll, want_greedy) in zip(got, want):
            assert ll == pytest.approx(want_ll, rel=1e-5, abs=1e-5) and greedy == want_greedy
        correct += int(max(range(2), key=lambda k: want[k][0]) == row["label"])
    acc = results["results"]["megapre_test_sst2"]["acc,none"]
    assert acc == pytest.approx(correct / 50)
    # the same task through the console script's front end (in this process)
    from megapre.cli.lm_eval import main

    _local_tasks_only(monkeypatch)
    out = tmp_path / "cli"
    code = main(["--model_args", f"load={lm.checkpoint},batch_size=4", "--tasks",
                 "megapre_test_sst2", "--include_path", str(sst2_task["tasks"]), "--device",
                 "cpu", "--output_path", str(out)])
    assert code == 0
    assert _results_file(out)["results"]["megapre_test_sst2"]["acc,none"] == pytest.approx(acc)


# -- (b) rolling log-likelihood over WikiText-2 ---------------------------------------------------
def test_rolling_word_perplexity_equals_text_file(ckpt, tmp_path, capsys):
    """One document of a few WikiText-2 paragraphs, scored by the harness (console script, a
    separate process through tools/lm_eval.py) and by megapre.evaluate --text-file."""
    head = wikitext_slice(6000)
    text = head[:head.rindex("\n")].strip()  # whole lines; no edge whitespace (word counts)
    assert text.count("\n") >= 5 and len(text.split()) > 800
    doc_file = tmp_path / "wiki_doc.txt"
    doc_file.write_text(text)  # exactly the document: no trailing newline
    data = tmp_path / "wiki.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    _write_task(tmp_path / "tasks", {
        "task": "megapre_test_wikitext", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                "bits_per_byte")]})
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the tool finds this checkout's megapre by itself
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "lm_eval.py"), "--model_args",
                           f"load={ckpt},batch_size=4", "--tasks", "megapre_test_wikitext",
                           "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
                           "--output_path", str(out), "--log_samples"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    harness = _results_file(out)["results"]["megapre_test_wikitext"]

    from megapre.cli.evaluate import main as evaluate

    code = evaluate(["--load", ckpt, "--text-file", str(doc_file), "--micro-batch-size", "4"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    ours = json.loads(stdout.strip().splitlines()[-1])
    assert ours["words"] == len(re.split(r"\s+", text)) and ours["windows"] > 10
    assert harness["word_perplexity,none"] == pytest.approx(ours["word_ppl"], rel=1e-6)
    byte_ppl = math.exp(ours["nll_sum"] / len(text.encode()))
    assert harness["byte_perplexity,none"] == pytest.approx(byte_ppl, rel=1e-6)
    samples = [json.loads(x) for f in out.rglob("samples_megapre_test_wikitext_*.jsonl")
               for x in f.read_text().splitlines()]
    assert len(samples) == 1
    assert float(samples[0]["filtered_resps"][0]) == pytest.approx(-ours["nll_sum"], rel=1e-6)


# -- generate_until, layouts, bad arguments -----------------------------------------------------
def _greedy_by_hand(lm: MegapreLM, prompt: str, steps: int) -> str:
    tok, gpt = lm.rt.tokenizer, lm.rt.model.models[0]
    ids = tok.encode(prompt) or [tok.eod]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits = gpt.gathered_logits(gpt(input_ids=torch.tensor([ids + new])))[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eod:
                break
            new.append(nxt)
    return tok.decode(new)


def test_generate_until_is_greedy_and_cut_at_until(lm):
    prompts = ["The tower is", "In 1998 the band", ""]
    full = [_greedy_by_hand(lm, p, 12) for p in prompts]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n\n\n"], "max_gen_toks": 12}), i)
            for i, p in enumerate(prompts)]
    assert lm.generate_until(reqs) == [t.split("\n\n\n")[0] for t in full]
    stop = full[0][4:8]
    assert stop and stop in full[0]
    cut = lm.generate_until([Instance("generate_until", {}, (prompts[0], {
        "until": [stop], "max_gen_toks": 12, "do_sample": False}), 0)])
    assert cut == [full[0].split(stop)[0]]


REQUESTS = [("The cat sat on the", " mat"), ("", "Hello world"), ("Valkyria Chronicles III",
                                                                  " is a tactical game")]
ROLLING = "Robert Boulter is an English film , television and theatre actor . " * 12


def _answers(lm: MegapreLM) -> dict:
    return {"ll": lm.loglikelihood([Instance("loglikelihood", {}, r, i)
                                    for i, r in enumerate(REQUESTS)]),
            "rolling": lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {},
                                                          (ROLLING,), 0)]),
            "gen": lm.generate_until([Instance("generate_until", {}, (
                "The tower", {"until": ["\n\n\n"], "max_gen_toks": 6}), 0)])}


def _layout_worker(rank: int, world: int, ckpt: str, tp: int, pp: int) -> dict:
    lm = MegapreLM(load=ckpt, batch_size=2, device="cpu", tensor_model_parallel_size=tp,
                   pipeline_model_parallel_size=pp)
    try:
        return _answers(lm)
    finally:
        lm.close()


@pytest.mark.slow
def test_tp2_and_pp2_answer_like_one_process(lm, ckpt):
    from megapre.parallel.testing import run_distributed

    one = _answers(lm)
    assert len(one["ll"]) == 3 and one["rolling"][0] < 0
    for tp, pp in ((2, 1), (1, 2)):
        for got in run_distributed(_layout_worker, 2, ckpt, tp, pp, backend=None,
                                   timeout_s=300):
            for (ll, greedy), (want, want_greedy) in zip(got["ll"], one["ll"]):
                assert ll == pytest.approx(want, rel=1e-5) and greedy == want_greedy, (tp, pp)
            assert got["rolling"][0] == pytest.approx(one["rolling"][0], rel=1e-5), (tp, pp)
            assert got["gen"] == one["gen"], (tp, pp)


def test_bad_model_arguments(ckpt, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown model argument.*pretrained"):
        MegapreLM(load=ckpt, pretrained="gpt2")
    with pytest.raises(ValueError, match="batch_size='auto'.*give a number"):
        MegapreLM(load=ckpt, batch_size="auto")
    with pytest.raises(ValueError, match="device 'mps'"):
        MegapreLM(load=ckpt, device="mps")
    bert = tmp_path / "bert_ckpt"
    shutil.copytree(ckpt, bert)
    for config in bert.glob("iter_*/config.json"):
        data = json.loads(config.read_text())
        data["model"]["model"] = "bert"
        config.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="holds a bert checkpoint"):
        MegapreLM(load=str(bert))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE 2 must equal .* = 1"):
        MegapreLM(load=ckpt)
    monkeypatch.delenv("WORLD_SIZE")
    from megapre.cli.lm_eval import main, with_default_model

    assert with_default_model(["--tasks", "x"]) == ["--model", "megapre", "--tasks", "x"]
    assert with_default_model(["run", "--tasks", "x"])[:3] == ["run", "--model", "megapre"]
    assert with_default_model(["--model", "hf", "--tasks", "x"])[:2] == ["--model", "hf"]
    assert with_default_model(["ls", "tasks"]) == ["ls", "tasks"]
    _local_tasks_only(monkeypatch)
    _write_task(tmp_path / "tasks", {
        "task": "megapre_test_empty", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "none.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
        "doc_to_target": "text", "metric_list": [{"metric": "word_perplexity"}]})
    capsys.readouterr()
    code = main(["--model_args", f"load={tmp_path / 'nothing'}", "--tasks",
                 "megapre_test_empty", "--include_path", str(tmp_path / "tasks"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(r"megapre-lm-eval: error: .*nothing", err.strip().splitlines()[-1]), err
