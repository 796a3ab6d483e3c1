"""tools/sweep.py: the search space, fail-fast validation, and real tiny runs ranked by valid loss,
resumed on rerun, with a failing run reported and not fatal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_counting_corpus
from megapre.cli import sweep as sweep_cli
from megapre.launch import sweep

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Counting sequences ending in EOD (NullTokenizer: eod = vocab_size); learnable in a few steps."""
    return write_counting_corpus(tmp_path_factory.mktemp("corpus") / "count_text_document")


def _base(corpus: str, cache: Path) -> list[str]:
    return ["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "8", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--min-lr", "1e-5", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--eval-interval", "4", "--eval-iters", "1",
            "--log-interval", "2", "--data-path", corpus, "--split", "90,5,5",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
            "--make-vocab-size-divisible-by", "8", "--num-workers", "0", "--device", "cpu",
            "--data-cache-path", str(cache)]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# -- the search space (no launches) --------------------------------------------------------

def test_grid_is_the_cartesian_product():
    pts = sweep.search_points([("lr", ["1e-3", "3e-3"]), ("global-batch-size", ["8", "16"])],
                              [], None, 0)
    assert pts == [{"lr": "1e-3", "global-batch-size": "8"},
                   {"lr": "1e-3", "global-batch-size": "16"},
                   {"lr": "3e-3", "global-batch-size": "8"},
                   {"lr": "3e-3", "global-batch-size": "16"}]


def test_random_draws_are_reproducible_and_in_range():
    choices = [sweep.parse_choice("lr=log:1e-4:1e-2"), sweep.parse_choice("lr-warmup-iters=0,10"),
               sweep.parse_choice("weight-decay=uniform:0:0.1"),
               sweep.parse_choice("seed=int:1:5")]
    a = sweep.random_points(choices, 20, seed=7)
    assert a == sweep.random_points(choices, 20, seed=7)
    assert a != sweep.random_points(choices, 20, seed=8)
    lrs = [float(p["lr"]) for p in a]
    assert all(1e-4 <= x <= 1e-2 for x in lrs)
    assert min(lrs) < 1e-3 < max(lrs)  # log-uniform spreads over both decades
    assert {p["lr-warmup-iters"] for p in a} == {"0", "10"}
    assert all(0 <= float(p["weight-decay"]) <= 0.1 for p in a)
    assert {int(p["seed"]) for p in a} <= {1, 2, 3, 4, 5}
    # grid x random: every grid point gets the same draws
    pts = sweep.search_points([("global-batch-size", ["8", "16"])], choices[:1], 3, 7)
    assert [p["lr"] for p in pts[:3]] == [p["lr"] for p in pts[3:]]


def test_point_flags_switches_and_lists():
    assert sweep.point_flags({"lr": "1e-3", "bf16": "true", "fp16": "false",
                              "data-path": "0.3 a 0.7 'b c'"}) == \
        ["--lr", "1e-3", "--bf16", "--data-path", "0.3", "a", "0.7", "b c"]
    assert sweep.run_name({"lr": "1e-3", "data-path": "/x y/z"}) == "lr=1e-3,data-path=_x_y_z"


@pytest.mark.parametrize("spec", ["lr", "lr=", "lr=log:0:1", "lr=log:1e-2:1e-4",
                                  "lr=uniform:a:b", "lr=1e-3,,2"])
def test_bad_choice_spec_is_an_error(spec):
    with pytest.raises(sweep.SweepError, match="--choice"):
        sweep.parse_choice(spec)


def test_ranking_valid_first_then_train_only_then_failed():
    def r(name, status="ok", valid=None, train=1.0):
        return {"name": name, "status": status, "final_valid_loss": valid, "train_loss": train}
    ranked = sweep.rank([r("failed", "failed: exit 1"), r("no-valid", train=0.1),
                         r("b", valid=2.0), r("a", valid=1.5)])
    assert [x["name"] for x in ranked] == ["a", "b", "no-valid", "failed"]
    assert [x["ranked_by"] for x in ranked] == ["valid", "valid", "train", None]
    assert [x["rank"] for x in ranked] == [1, 2, 3, 4]


def test_summarize_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"iteration": 2, "loss": 3.0, "tokens_per_s": 10.0},
            {"iteration": 4, "split": "valid", "loss": 2.5},
            {"iteration": 4, "loss": 2.0, "tokens_per_s": 100.0},
            {"iteration": 8, "split": "valid", "loss": 2.7},
            {"iteration": 8, "split": "test", "loss": 9.0},
            {"iteration": 8, "loss": 1.0, "tokens_per_s": 200.0}]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows) + '{"torn')
    s = sweep.summarize(*sweep.read_metrics(path))
    assert s == {"final_valid_loss": 2.7, "best_valid_loss": 2.5, "train_loss": 1.0,
                 "tokens_per_s": 150.0, "iterations": 8}
    nan = sweep.summarize([{"loss": float("nan"), "iteration": 1}], [])
    assert sweep._status(0, False, nan, {}) == "failed: non-finite loss"
    ok = sweep.summarize([{"loss": 1.0, "iteration": 3}], [])
    assert sweep._status(0, False, ok, {"exit_reason": "finished"}) == "ok"
    assert sweep._status(0, False, ok, {"exit_reason": "exit-duration-in-mins"}) == "ok"
    assert sweep._status(0, False, ok, {"exit_reason": "SIGTERM", "iteration": 3}) == \
        "failed: stopped by SIGTERM at iteration 3"
    assert sweep._status(0, False, ok, None).startswith("failed: no run summary")
    assert sweep._status(1, False, ok, None) == "failed: exit 1"
    assert sweep._status(None, True, ok, None) == "failed: timeout"


def test_summary_is_read_from_the_summary_file(tmp_path):
    path = tmp_path / "metrics.summary.json"
    path.write_text('{"exit_reason": "finished", "iteration": 8}\n')
    assert sweep.read_summary(path) == {"exit_reason": "finished", "iteration": 8}
    path.write_text('{"exit_reason": "fin')
    assert sweep.read_summary(path) is None
    assert sweep.read_summary(tmp_path / "absent.json") is None


# -- fail fast: nothing is launched ---------------------------------------------------------

@pytest.mark.parametrize("spec,needle", [
    (["--grid", "lrr=1e-3,3e-3"], "--lrr"),
    (["--grid", "global-batch-size=8,7"], "--global-batch-size"),
    (["--grid", "lr=1e-3,fast"], "--lr"),
    (["--grid", "lr=1e-3", "--grid", "lr=3e-3"], "lr"),
    (["--grid", "save=a,b"], "--save"),
    (["--choice", "lr=log:1e-4:1e-2"], "--random"),
])
def test_bad_spec_exits_2_before_any_launch(corpus, tmp_path, capsys, spec, needle):
    runs = tmp_path / "runs"
    rc = sweep_cli.main([*spec, "--runs-dir", str(runs), "--", *_base(corpus, tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and "Traceback" not in err
    assert not runs.exists()


def test_bad_base_flag_exits_2(corpus, tmp_path, capsys):
    rc = sweep_cli.main(["--grid", "lr=1e-3,3e-3", "--runs-dir", str(tmp_path / "runs"), "--",
                     *_base(corpus, tmp_path), "--num-attention-heads", "3"])
    assert rc == 2
    assert "--num-attention-heads" in capsys.readouterr().err


def test_base_config_is_checked(corpus, tmp_path, capsys):
    cfg = tmp_path / "base.json"
    rc = sweep_cli.main(["--grid", "lr=1e-3", "--runs-dir", str(tmp_path / "r"), "--base-config",
                     str(cfg)])
    assert rc == 2 and f"--base-config {cfg}" in capsys.readouterr().err
    cfg.write_text(json.dumps({"num_layers": 2, "hidden_szie": 32}))
    rc = sweep_cli.main(["--grid", "lr=1e-3", "--runs-dir", str(tmp_path / "r"), "--base-config",
                     str(cfg), "--", *_base(corpus, tmp_path)])
    assert rc == 2 and "hidden_szie" in capsys.readouterr().err
    cfg.write_text(json.dumps({"save": str(tmp_path / "ckpt")}))
    rc = sweep_cli.main(["--grid", "lr=1e-3", "--runs-dir", str(tmp_path / "r"), "--base-config",
                     str(cfg), "--", *_base(corpus, tmp_path)])
    assert rc == 2 and "--save" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    args = sweep_cli.parse_args(["--grid", "lr=1e-3", "--runs-dir", "r", "--base-config", str(cfg),
                             "--", "--num-layers", "3"])
    assert args.base == ["--config", str(cfg.resolve()), "--num-layers", "3"]


# -- real runs -------------------------------------------------------------------------------

def _results(runs: Path) -> list[dict]:
    return json.loads((runs / "sweep.json").read_text())


@pytest.mark.slow
def test_grid_sweep_ranks_four_runs_and_rerun_skips(corpus, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--grid", "lr=1e-3,1e-2",
           "--grid", "global-batch-size=4,8", "--runs-dir", str(runs), "--parallel-runs", "2",
           "--", *_base(corpus, tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = _results(runs)
    assert len(res) == 4 and all(r["status"] == "ok" for r in res)
    assert {(r["point"]["lr"], r["point"]["global-batch-size"]) for r in res} == \
        {("1e-3", "4"), ("1e-3", "8"), ("1e-2", "4"), ("1e-2", "8")}
    losses = [r["final_valid_loss"] for r in res]
    assert losses == sorted(losses) and [r["rank"] for r in res] == [1, 2, 3, 4]
    for r in res:
        d = runs / r["name"]
        valid = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()
                 if '"valid"' in x]
        assert [v["iteration"] for v in valid] == [4, 8]
        assert r["final_valid_loss"] == valid[-1]["loss"]
        assert r["best_valid_loss"] == min(v["loss"] for v in valid)
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert json.loads((d / "result.json").read_text())["flags"] == r["flags"]
        assert "run summary:" in (d / "log.txt").read_text()
        assert json.loads((d / "metrics.summary.json").read_text())["exit_reason"] == "finished"
    assert "[sweep] plot:" in proc.stdout or "[sweep] no plot: plotting needs matplotlib" \
        in proc.stdout
    tsv = (runs / "sweep.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:3] == ["rank", "lr", "global-batch-size"] and len(tsv) == 5
    # the table on stdout lists the runs best first
    table = proc.stdout[proc.stdout.index("rank"):].splitlines()[1:5]
    assert [line.split()[0] for line in table] == ["1", "2", "3", "4"]
    # a rerun launches nothing and gives the same table
    logs = {r["name"]: (runs / r["name"] / "log.txt").stat().st_mtime_ns for r in res}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("[sweep] skip") == 4 and "[sweep] start" not in again.stdout
    assert [r["name"] for r in _results(runs)] == [r["name"] for r in res]
    assert logs == {r["name"]: (runs / r["name"] / "log.txt").stat().st_mtime_ns for r in res}


@pytest.mark.slow
def test_failing_run_is_reported_and_others_ranked(corpus, tmp_path, capsys):
    runs = tmp_path / "runs"
    bad = str(tmp_path / "missing_text_document")
    rc = sweep_cli.main(["--grid", f"data-path={corpus},{bad}", "--runs-dir", str(runs),
                     "--parallel-runs", "2", "--",
                     *_base(corpus, tmp_path / "cache"), "--train-iters", "4"])
    out = capsys.readouterr().out
    assert rc == 1
    res = _results(runs)
    assert [r["status"] for r in res] == ["ok", "failed: exit 2"]
    assert res[0]["final_valid_loss"] is not None and res[0]["rank"] == 1
    assert res[1]["final_valid_loss"] is None and res[1]["rank"] == 2
    assert any("missing_text_document" in line for line in res[1]["log_tail"])
    assert "missing_text_document" in out.split("failed: exit 2")[-1]  # log tail printed
