"""The machinery of a small hyperparameter search (front end: megapre/cli/sweep.py): search
points from grid and random axes, one short `megapre.pretrain` run per point in its own process
and directory (a run that crashes, diverges or hangs is reported as failed without taking the
sweep down; a finished run is skipped on rerun), and the ranked table of their results.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PACKAGE_PARENT = Path(__file__).resolve().parents[2]
LOG_TAIL_LINES = 20
# Flags a sweep cannot pass through: the metrics file is per run, and runs writing one checkpoint
# directory would overwrite each other. (--load is fine: e.g. every run fine-tunes one checkpoint.)
SAVE_WHY = "runs would overwrite one checkpoint directory; sweeps train without --save"
RESERVED = {"--metrics-path": "the sweep writes RUN/metrics.jsonl itself", "--save": SAVE_WHY}


class SweepError(ValueError):
    """A bad sweep spec; the message names the option and value."""


# -- the search space --------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """One random axis: `log:LO:HI` (log-uniform), `uniform:LO:HI`, `int:LO:HI` or `a,b,c`."""
    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple[str, ...] = ()

    def draw(self, rng: random.Random) -> str:
        if self.kind == "log":
            return _fmt(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.kind == "uniform":
            return _fmt(rng.uniform(self.low, self.high))
        if self.kind == "int":
            return str(rng.randint(int(self.low), int(self.high)))
        return rng.choice(self.values)


def _fmt(x: float) -> str:
    return format(x, ".4g")


def _split_spec(option: str, spec: str) -> tuple[str, str]:
    name, sep, rest = spec.partition("=")
    name = name.strip().lstrip("-")
    if not sep or not name or not rest.strip():
        raise SweepError(f"{option} {spec!r}: expected NAME=VALUES, e.g. {option} lr=1e-3,3e-3")
    return name, rest.strip()


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """`lr=1e-3,3e-3` -> ('lr', ['1e-3', '3e-3'])."""
    name, rest = _split_spec("--grid", spec)
    values = [v.strip() for v in rest.split(",")]
    if any(not v for v in values):
        raise SweepError(f"--grid {spec!r}: empty value in the list")
    return name, values


def parse_choice(spec: str) -> Choice:
    name, rest = _split_spec("--choice", spec)
    kind, _, bounds = rest.partition(":")
    if kind not in ("log", "uniform", "int"):
        values = tuple(v.strip() for v in rest.split(","))
        if any(not v for v in values):
            raise SweepError(f"--choice {spec!r}: empty value in the list")
        return Choice(name, "categorical", values=values)
    parts = bounds.split(":")
    try:
        low, high = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not low <= high or (kind == "log" and low <= 0):
        raise SweepError(f"--choice {spec!r}: expected {kind}:LO:HI with LO <= HI"
                         + (" and LO > 0" if kind == "log" else ""))
    return Choice(name, kind, low, high)


def grid_points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The cartesian product, first axis slowest."""
    names = [n for n, _ in axes]
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in axes))]


def random_points(choices: list[Choice], n: int, seed: int) -> list[dict[str, str]]:
    """N draws; one seeded generator, so the same spec and seed give the same runs on a rerun."""
    rng = random.Random(seed)
    return [{c.name: c.draw(rng) for c in choices} for _ in range(n)]


def search_points(grid: list[tuple[str, list[str]]], choices: list[Choice],
                  n_random: int | None, seed: int) -> list[dict[str, str]]:
    """Grid x random draws (each grid point is combined with every draw)."""
    names = [n for n, _ in grid] + [c.name for c in choices]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SweepError(f"flag(s) {', '.join(sorted(dup))} given to more than one --grid/--choice")
    if choices and n_random is None:
        raise SweepError("--choice needs --random N (how many draws)")
    if n_random is not None and (n_random < 1 or not choices):
        raise SweepError("--random N needs N >= 1 and at least one --choice NAME=SPEC")
    points = grid_points(grid)
    if n_random is not None:
        draws = random_points(choices, n_random, seed)
        points = [{**g, **d} for g in points for d in draws]
    if not points or points == [{}]:
        raise SweepError("nothing to sweep: give --grid NAME=V1,V2 and/or --random N --choice ...")
    return points


# -- one run ---------------------------------------------------------------------------------

def point_flags(point: dict[str, str]) -> list[str]:
    """`true`/`false` turn a switch on/off; anything else is `--name value`, split like a shell
    would so list flags can be swept: --grid "data-path=0.3 a 0.7 b,a"."""
    out: list[str] = []
    for name, value in point.items():
        if value.lower() == "true":
            out.append(f"--{name}")
        elif value.lower() != "false":
            out += [f"--{name}", *shlex.split(value)]
    return out


def run_name(point: dict[str, str]) -> str:
    text = ",".join(f"{k}={v}" for k, v in point.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if len(safe) > 120:
        safe = safe[:100] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]
    return safe


@dataclass
class Run:
    name: str
    point: dict[str, str]
    flags: list[str]
    directory: Path


def launch_command(flags: list[str], metrics: Path, nproc: int) -> list[str]:
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(nproc)]
    else:
        head = [sys.executable]
    return [*head, "-m", "megapre.pretrain", *flags, "--metrics-path", str(metrics)]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return []


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records); a torn last line (killed run) is ignored."""
    train, valid = [], []
    if not path.is_file():
        return train, valid
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "split" not in row:
            train.append(row)
        elif row["split"] == "valid":
            valid.append(row)
    return train, valid


def summarize(train: list[dict], valid: list[dict]) -> dict[str, Any]:
    """Final/best valid loss, final train loss, and mean tokens/s without the first (warm-up)
    logging window, which includes compilation and allocator growth."""
    tps = [r["tokens_per_s"] for r in train if r.get("tokens_per_s") is not None]
    tps = tps[1:] if len(tps) > 1 else tps
    vl = [r["loss"] for r in valid]
    return {"final_valid_loss": vl[-1] if vl else None,
            "best_valid_loss": min(vl, key=lambda x: (math.isnan(x), x)) if vl else None,
            "train_loss": train[-1]["loss"] if train else None,
            "tokens_per_s": sum(tps) / len(tps) if tps else None,
            "iterations": train[-1].get("iteration") if train else None}


def read_summary(path: Path) -> dict[str, Any] | None:
    """The trainer's end-of-run summary (RUN/metrics.summary.json; absent if it did not finish)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _status(rc: int | None, timed_out: bool, stats: dict[str, Any],
            summary: dict[str, Any] | None = None) -> str:
    """A run stopped by SIGTERM (an interrupted sweep, a preempted job) exits 0 but is not a
    result: it fails, so a rerun retries it. --exit-duration-in-mins / --exit-interval are
    deliberate budgets and count as finished."""
    if timed_out:
        return "failed: timeout"
    if rc != 0:
        return f"failed: exit {rc}"
    if summary is None:
        return "failed: no run summary (metrics.summary.json): the trainer did not finish"
    if summary.get("exit_reason") == "SIGTERM":
        return f"failed: stopped by SIGTERM at iteration {summary.get('iteration')}"
    if stats["train_loss"] is None:
        return "failed: no training records in metrics.jsonl"
    losses = [stats["train_loss"], stats["final_valid_loss"]]
    if any(x is not None and not math.isfinite(x) for x in losses):
        return "failed: non-finite loss"
    return "ok"


# Runs start in their own session (so a timeout can kill torchrun and its workers together); the
# sweep therefore forwards an interrupt to them itself instead of leaving them orphaned.
LIVE: set[subprocess.Popen] = set()


def kill(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def execute(run: Run, nproc: int, timeout: float | None,
            echo: Callable[[str], None]) -> dict[str, Any]:
    """Launch one run, wait, and write RUN/result.json; never raises for a failing run."""
    run.directory.mkdir(parents=True, exist_ok=True)
    metrics, log = run.directory / "metrics.jsonl", run.directory / "log.txt"
    summary_file = run.directory / "metrics.summary.json"
    for stale in (metrics, summary_file):
        stale.unlink(missing_ok=True)  # a retried run starts clean
    cmd = launch_command(run.flags, metrics, nproc)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # the log is live, and its tail is there when a run is killed
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
    echo(f"[sweep] start {run.name}")
    t0, rc, timed_out = time.time(), None, False
    with open(log, "w") as out:
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        except OSError as e:  # e.g. the interpreter vanished: this run fails, the sweep goes on
            out.write(f"sweep: could not launch {cmd[0]}: {e}\n")
            rc = -1
        else:
            LIVE.add(proc)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill(proc, signal.SIGKILL)
                proc.wait()
            finally:
                LIVE.discard(proc)
    wall = time.time() - t0
    stats = summarize(*read_metrics(metrics))
    summary = read_summary(summary_file)
    status = _status(rc, timed_out, stats, summary)
    result = {"name": run.name, "point": run.point, "flags": run.flags, "command": cmd,
              "status": status, "returncode": rc, "wall_s": wall, **stats,
              "exit_reason": summary.get("exit_reason") if summary else None,
              "log_tail": [] if status == "ok" else _tail(log)}
    _write_json(run.directory / "result.json", result)
    echo(f"[sweep] {status:<6} {run.name} ({wall:.1f}s)")
    return result


def finished(run: Run) -> dict[str, Any] | None:
    """A previous result with the same flags that succeeded (failed runs are retried)."""
    path = run.directory / "result.json"
    try:
        prev = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return prev if prev.get("flags") == run.flags and prev.get("status") == "ok" else None


# -- the table -------------------------------------------------------------------------------

def rank(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Valid-loss runs first (by final valid loss), then runs without validation by train
    loss (the two losses are not comparable, so they are not interleaved), failed last."""
    def key(r: dict[str, Any]) -> tuple:
        if r["status"] != "ok":
            return (2, 0.0, r["name"])
        if r["final_valid_loss"] is not None:
            return (0, r["final_valid_loss"], r["name"])
        return (1, r["train_loss"], r["name"])
    ranked = sorted(results, key=key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
        r["ranked_by"] = ("valid" if r["final_valid_loss"] is not None else "train") \
            if r["status"] == "ok" else None
    return ranked


def _cell(loss: float | None) -> str:
    if loss is None:
        return "-"
    return f"{loss:.1f}" if abs(loss) >= 1000 else f"{loss:.4f}"


def table_rows(ranked: list[dict[str, Any]], names: list[str]) -> list[list[str]]:
    head = ["rank", *names, "valid_loss", "best_valid", "train_loss", "tokens/s", "wall_s",
            "status"]
    rows = [head]
    for r in ranked:
        valid = _cell(r["final_valid_loss"])
        if r.get("ranked_by") == "train":
            valid = "- (by train)"
        rows.append([str(r["rank"]), *(r["point"].get(n, "") for n in names), valid,
                     _cell(r["best_valid_loss"]), _cell(r["train_loss"]),
                     "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}",
                     f"{r['wall_s']:.1f}", r["status"]])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def write_outputs(runs_dir: Path, ranked: list[dict[str, Any]], rows: list[list[str]]) -> None:
    _write_json(runs_dir / "sweep.json", ranked)
    tmp = runs_dir / "sweep.tsv.tmp"
    tmp.write_text("\n".join("\t".join(row) for row in rows) + "\n")
    os.replace(tmp, runs_dir / "sweep.tsv")


# -- CLI -------------------------------------------------------------------------------------
