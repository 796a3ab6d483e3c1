"""Front-end polish: flag typos get a suggestion, --help shows choices and only useful defaults,
every program names itself as it was started, the memory estimate names what it assumed,
generate's bad prompts and temperatures are one line, and megapre-plot draws metrics files."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megapre.cli import estimate_memory, generate, plot_metrics
from megapre.cli.common import prog_name
from megapre.cli.flags import build_parser, parse_config
from megapre.inference.sampling import MIN_TEMPERATURE, SamplingConfig
from megapre.model.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_flag_typo_suggests_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--hiden-size", "64", "--seq-lenght=8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2
    assert "--hiden-size: did you mean --hidden-size?" in err
    assert "--seq-lenght: did you mean --seq-length?" in err


def test_help_shows_choices_and_only_meaningful_defaults():
    text = build_parser().format_help()
    assert "--no-bias-gelu-fusion" in text and "--bf16" in text
    for choices in ("--model {gpt,bert}", "--lr-decay-style {cosine,linear,constant,WSD,",
                    "--normalization {LayerNorm,RMSNorm}",
                    "--pipeline-schedule {1f1b,gpipe,interleaved}"):
        assert choices in text, choices
    flat = " ".join(text.split())
    assert "(default: True)" not in flat and "(default: False)" not in flat
    assert "(default: None)" not in flat
    # help that already names its default is not given a second one
    assert "key/value heads for grouped-query attention (default: = heads) (default" not in flat
    for action in build_parser()._actions:
        assert (action.help or "").count("default") <= 1, action.help


def test_program_names_follow_how_they_were_started(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/megapre-sweep"])
    assert prog_name("megapre-sweep") == "megapre-sweep"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/megapre-estimate-memory"])
    assert prog_name("x") == "megapre-estimate-memory"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "tools" / "sweep.py")])
    assert prog_name("megapre-sweep") == "tools/sweep.py"
    monkeypatch.setattr(sys, "argv", ["-m"])
    assert prog_name("megapre.pretrain") == "megapre.pretrain"


def test_estimate_usage_names_the_console_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/megapre-estimate-memory"])
    assert estimate_memory.main(["--world-size", "0"]) == 2
    assert capsys.readouterr().err.startswith("megapre-estimate-memory: error: --world-size=0")
    with pytest.raises(SystemExit):
        estimate_memory.main(["--help"])
    assert "usage: megapre-estimate-memory" in capsys.readouterr().out


CONSOLE_SCRIPTS = {  # console script -> the module whose main() it runs
    "megapre-preprocess-data": "preprocess_data", "megapre-merge-datasets": "merge_datasets",
    "megapre-build-index": "build_index", "megapre-train-tokenizer": "train_tokenizer",
    "megapre-make-demo-corpus": "make_demo_corpus", "megapre-checkpoint": "checkpoint",
    "megapre-make-authorship-task": "make_authorship_task",
    "megapre-bert-samples": "bert_samples", "megapre-sweep": "sweep", "megapre-plot": "plot_metrics",
    "megapre-estimate-memory": "estimate_memory", "megapre-pretrain": "pretrain",
    "megapre-evaluate": "evaluate", "megapre-generate": "generate"}


@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_every_console_script_names_itself_in_usage(script, monkeypatch, capsys):
    import importlib

    setup = (ROOT / "setup.py").read_text()
    assert f"{script} = megapre.cli.{CONSOLE_SCRIPTS[script]}:main" in setup
    main = importlib.import_module(f"megapre.cli.{CONSOLE_SCRIPTS[script]}").main
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", "--help"])
    try:
        code = main(["--help"])
    except SystemExit as e:  # argparse's --help
        code = e.code
    assert code in (0, None)
    assert f"usage: {script} " in capsys.readouterr().out, script


PLAN_1B3 = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16",
            "--seq-length", "2048", "--micro-batch-size", "4", "--global-batch-size", "32",
            "--bf16", "--vocab-size", "50257", "--world-size", "8",
            "--tensor-model-parallel-size", "2", "--json"]


def _peak(capsys, *extra: str) -> dict:
    assert estimate_memory.main([*PLAN_1B3, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_defaults_to_the_gpu_path_and_says_so(capsys):
    auto, cuda, cpu = _peak(capsys), _peak(capsys, "--device", "cuda"), _peak(capsys, "--device", "cpu")
    assert auto["peak_bytes"] == cuda["peak_bytes"] != cpu["peak_bytes"]
    assert (auto["device"], auto["attention_backend"]) == ("cuda", "sdpa")
    assert cpu["device"] == "cpu"
    assert estimate_memory.main([a for a in PLAN_1B3 if a != "--json"]) == 0
    out = capsys.readouterr().out
    assert "assumed: device cuda (--device cpu estimates a CPU run), attention backend sdpa" in out


# -- generate: prompts and temperature -------------------------------------------------------

def test_tiny_temperature_is_refused_with_its_minimum():
    for t in (1e-45, 1e-6):
        with pytest.raises(ValueError, match=f"use >= {MIN_TEMPERATURE:g}, or 0"):
            SamplingConfig(temperature=t)
    for t in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="must be a number >= 0"):
            SamplingConfig(temperature=t)
    assert SamplingConfig(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE


def test_tiny_temperature_sampling_is_finite_at_the_minimum():
    import torch

    from megapre.inference.sampling import sample_next

    logits = torch.tensor([[30.0, 29.9, -40.0, 5.0]])
    got = sample_next(logits, SamplingConfig(temperature=MIN_TEMPERATURE), 4,
                      torch.Generator().manual_seed(0))
    assert got.tolist() == [0]


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"prompt": [], "prompt_file": None, **kw})


def test_prompt_that_is_not_utf8_is_one_line():
    bad = b"caf\xe9 ok".decode("utf-8", "surrogateescape")  # what Python makes of such argv
    with pytest.raises(ConfigError, match=r"--prompt #2: not valid UTF-8 text \(byte 0xe9 at "
                                          r"character 3\)"):
        generate.read_prompts(_args(prompt=["fine", bad]))


def test_prompt_file_reasons(tmp_path):
    with pytest.raises(ConfigError, match="/dev/null: holds no prompt"):
        generate.read_prompts(_args(prompt_file=Path("/dev/null")))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ConfigError, match="blank.txt: holds no prompt"):
        generate.read_prompts(_args(prompt_file=blank))
    with pytest.raises(ConfigError, match="is a directory"):
        generate.read_prompts(_args(prompt_file=tmp_path))
    with pytest.raises(ConfigError, match="none.txt: file not found"):
        generate.read_prompts(_args(prompt_file=tmp_path / "none.txt"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 3\)"):
        generate.read_prompts(_args(prompt_file=latin1))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"printf '1 2\\n3\\n' > {fifo}"])
    assert generate.read_prompts(_args(prompt_file=fifo)) == ["1 2", "3"]  # <(...) works
    writer.wait(timeout=30)


def test_generate_cli_bad_temperature_is_one_line(capsys, tmp_path):
    rc = generate.main(["--load", str(tmp_path), "--prompt", "1", "--temperature", "1e-45"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("megapre.generate: error: --temperature")


# -- megapre-plot ----------------------------------------------------------------------------

def _metrics(path: Path, scale: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"iteration": i, "loss": scale * 5 / i, "lr": 1e-3, "grad_norm": 1.0 / i,
             "tokens_per_s": 1000.0 + i} for i in range(1, 11)]
    rows.append({"iteration": 10, "split": "valid", "loss": scale * 0.6, "ppl": 1.8})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    return path


def test_plot_reads_runs_and_labels_them(tmp_path):
    s = plot_metrics.read_series(_metrics(tmp_path / "lr-1e-3" / "metrics.jsonl", 1.0))
    assert s.label == "lr-1e-3" and len(s.train) == 10 and len(s.valid) == 1
    assert plot_metrics.run_label(tmp_path / "baseline.jsonl") == "baseline"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no training or validation records"):
        plot_metrics.read_series(empty)


def test_plot_writes_a_png_of_several_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install "
                                             "'megapre[plot]'); the PNG cannot be drawn")
    a = _metrics(tmp_path / "a" / "metrics.jsonl", 1.0)
    b = _metrics(tmp_path / "b" / "metrics.jsonl", 2.0)
    out = tmp_path / "plot.png"
    assert plot_metrics.main([str(a), str(b), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_or_with_missing_files_is_one_line(tmp_path, capsys):
    rc = plot_metrics.main([str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "p.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope.jsonl: metrics file not found" in err[0]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        a = _metrics(tmp_path / "a" / "metrics.jsonl", 1.0)
        assert plot_metrics.main([str(a), "-o", str(tmp_path / "p.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install 'megapre[plot]'" in err[0]


def test_plot_tool_runs_from_a_checkout(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tools/plot_metrics.py")


# -- configuration errors under torchrun ------------------------------------------------------

def test_input_error_is_recorded_for_torchrun(tmp_path, monkeypatch, capsys):
    from megapre.cli.common import run_cli

    err_file = tmp_path / "attempt_0" / "1" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err_file))
    monkeypatch.setenv("RANK", "1")

    def body() -> int:
        raise ConfigError("--exit-duration-in-mins must be > 0, got -1.0")

    assert run_cli("megapre.pretrain", body) == 2
    assert capsys.readouterr().err == ""  # only rank 0 prints
    line = "megapre.pretrain: error: --exit-duration-in-mins must be > 0, got -1.0"
    recorded = json.loads(err_file.read_text())["message"]
    assert recorded["message"] == recorded["extraInfo"]["py_callstack"] == line


@pytest.mark.slow
def test_torchrun_config_error_is_printed_once_and_quoted_by_the_report(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "megapre.pretrain", "--data-path", "x",
                           "--tokenizer-type", "NullTokenizer", "--vocab-size", "39",
                           "--exit-duration-in-mins", "-1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    line = "megapre.pretrain: error: --exit-duration-in-mins must be > 0, got -1.0"
    assert proc.returncode != 0
    assert [x for x in proc.stderr.splitlines() if x.startswith("megapre.pretrain: ")] == [line]
    assert "To enable traceback" not in proc.stderr and f"traceback : {line}" in proc.stderr


def test_sweep_plots_its_runs(tmp_path):
    from megapre.cli.sweep import plot_runs

    _metrics(tmp_path / "lr-1e-3" / "metrics.jsonl", 1.0)
    _metrics(tmp_path / "lr-1e-2" / "metrics.jsonl", 2.0)
    ranked = [{"name": "lr-1e-3"}, {"name": "lr-1e-2"}, {"name": "crashed-early"}]
    line = plot_runs(tmp_path, ranked)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert line.startswith("[sweep] no plot: plotting needs matplotlib")
        return
    assert line == f"[sweep] plot: {tmp_path / 'sweep.png'}"
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_runs(tmp_path / "none", [{"name": "x"}]) == \
        "[sweep] no plot: no run logged any metrics"
