"""`python tools/sweep.py --grid lr=1e-3,3e-3 --runs-dir DIR -- <pretrain flags>` (console
`megapre-sweep`): a small hyperparameter search over short megapre.pretrain runs.

Every run's flags are parsed and validated before the first launch: a typo costs seconds, not the
first run's wall time. The runs, their results and the table come from megapre/launch/sweep.py.
Exit codes: 0 every run finished, 1 some run failed (the table says which), 2 bad sweep spec.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megapre.errors import ConfigError
from megapre.launch.sweep import (LIVE, RESERVED, SAVE_WHY, Choice, Run, SweepError, execute,
                                  finished, format_table, kill, parse_choice, parse_grid,
                                  point_flags, rank, run_name, search_points, table_rows,
                                  write_outputs)
from megapre.train.args import validate

from .common import prog_name
from .flags import build_parser as pretrain_parser
from .flags import parse_config


def check_flags(flags: list[str], world_size: int) -> None:
    """Parse and validate like the trainer would; argparse's exit becomes a SweepError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfg = parse_config(flags)
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise SweepError(msg[-1] if msg else "could not parse the flags") from None
    except (ConfigError, ValueError) as e:
        raise SweepError(str(e)) from None
    if cfg.checkpoint.save is not None:
        raise SweepError(f"--save (or 'save' in --config): {SAVE_WHY}")
    try:
        validate(cfg, world_size)
    except ConfigError as e:
        raise SweepError(str(e)) from None



def plot_runs(runs_dir: Path, ranked: list[dict]) -> str:
    """RUNS/sweep.png: every run's curves, labelled by run name (best first); returns the line
    to print (where it went, or why there is none)."""
    from .plot_metrics import plot, read_series

    series = []
    for r in ranked:
        with contextlib.suppress(FileNotFoundError, ValueError):  # a run that logged nothing
            series.append(read_series(runs_dir / r["name"] / "metrics.jsonl", r["name"]))
    if not series:
        return "[sweep] no plot: no run logged any metrics"
    try:
        return f"[sweep] plot: {plot(series, runs_dir / 'sweep.png', f'sweep {runs_dir.name}')}"
    except ConfigError as e:
        return f"[sweep] no plot: {e}"


@dataclass
class SweepArgs:
    grid: list[tuple[str, list[str]]] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    random: int | None = None
    seed: int = 0
    runs_dir: Path = Path("sweep")
    nproc_per_node: int = 1
    parallel_runs: int = 1
    run_timeout: float | None = None
    base: list[str] = field(default_factory=list)


def build_parser(prog: str = "megapre-sweep") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [--grid NAME=V1,V2 ...] [--random N --choice NAME=SPEC "
        "...] --runs-dir DIR [options] -- <megapre.pretrain flags>",
        description="Launch short megapre.pretrain runs over a grid and/or random draws of flag "
                    "values and rank them by validation loss. Flags after -- are shared by all runs.",
        epilog="Each run writes RUN/{log.txt,metrics.jsonl,result.json} under --runs-dir; the table "
               "goes to stdout and --runs-dir/sweep.{json,tsv}. Rerunning the same command skips "
               "runs that finished with the same flags and retries failed ones. Every run's flags "
               "are validated before the first launch. Exit: 0 all runs ok, 1 some run failed, "
               "2 bad spec.")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help="pretrain flag and its values; several --grid form a cartesian product")
    p.add_argument("--random", type=int, metavar="N", help="draw N points from the --choice axes")
    p.add_argument("--choice", action="append", default=[], metavar="NAME=SPEC",
                   help="random axis: log:LO:HI (log-uniform), uniform:LO:HI, int:LO:HI or A,B,C")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument("--runs-dir", type=Path, required=True, help="one sub-directory per run")
    p.add_argument("--base-config", type=Path, help="YAML/JSON passed to every run as --config")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes per run (> 1 launches through torchrun)")
    p.add_argument("--parallel-runs", type=int, default=1, help="runs launched at the same time")
    p.add_argument("--run-timeout", type=float, help="seconds before a run is killed (failed)")
    return p


def parse_args(argv: list[str], prog: str = "megapre-sweep") -> SweepArgs:
    own, base = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    ns = build_parser(prog).parse_args(own)
    for opt, value in (("--nproc-per-node", ns.nproc_per_node),
                       ("--parallel-runs", ns.parallel_runs)):
        if value < 1:
            raise SweepError(f"{opt} must be >= 1, got {value}")
    if ns.run_timeout is not None and ns.run_timeout <= 0:
        raise SweepError(f"--run-timeout must be > 0, got {ns.run_timeout}")
    if ns.base_config is not None:
        if not ns.base_config.is_file():
            raise SweepError(f"--base-config {ns.base_config}: file not found")
        base = ["--config", str(ns.base_config.resolve()), *base]
    for tok in base:
        name = tok.split("=", 1)[0]
        if name in RESERVED:
            raise SweepError(f"{name} in the base flags: {RESERVED[name]}; drop it")
    return SweepArgs([parse_grid(g) for g in ns.grid], [parse_choice(c) for c in ns.choice],
                     ns.random, ns.seed, ns.runs_dir, ns.nproc_per_node, ns.parallel_runs,
                     ns.run_timeout, base)


def plan(args: SweepArgs) -> list[Run]:
    """All runs, each with validated flags; raises SweepError before anything is launched."""
    known = {s for a in pretrain_parser()._actions for s in a.option_strings}
    names = [n for n, _ in args.grid] + [c.name for c in args.choices]
    for name in names:
        if f"--{name}" in RESERVED:
            raise SweepError(f"--{name} cannot be swept: {RESERVED[f'--{name}']}")
        if f"--{name}" not in known:
            raise SweepError(f"--{name} is not a megapre.pretrain flag "
                             "(see python -m megapre.pretrain --help)")
    runs = []
    for point in search_points(args.grid, args.choices, args.random, args.seed):
        flags = [*args.base, *point_flags(point)]
        name = run_name(point)
        try:
            check_flags(flags, args.nproc_per_node)
        except SweepError as e:
            raise SweepError(f"run {name}: {e}") from None
        runs.append(Run(name, point, flags, args.runs_dir / name))
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            raise SweepError(f"two runs map to directory {run.name}: repeated draws or values; "
                             "use a wider --choice or fewer --random draws")
        seen[run.name] = run
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog_name("megapre-sweep")
    try:
        args = parse_args(argv, prog)
        runs = plan(args)
    except SweepError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    echo = lambda msg: print(msg, flush=True)  # noqa: E731
    todo, results = [], []
    for run in runs:
        prev = finished(run)
        if prev is not None:
            echo(f"[sweep] skip   {run.name} (finished earlier)")
            results.append(prev)
        else:
            todo.append(run)
    pool = ThreadPoolExecutor(max_workers=args.parallel_runs)
    try:
        results += list(pool.map(
            lambda r: execute(r, args.nproc_per_node, args.run_timeout, echo), todo))
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(LIVE):
            kill(proc, signal.SIGTERM)
        print("sweep: interrupted; finished runs are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        pool.shutdown(wait=True)
    names = list(runs[0].point)
    ranked = rank(results)
    rows = table_rows(ranked, names)
    write_outputs(args.runs_dir, ranked, rows)
    print(format_table(rows))
    print(plot_runs(args.runs_dir, ranked))
    for r in ranked:
        if r["status"] != "ok":
            print(f"\n[sweep] {r['name']} {r['status']}; last lines of "
                  f"{args.runs_dir / r['name'] / 'log.txt'}:")
            print("\n".join("    " + line for line in r["log_tail"]))
    return 0 if all(r["status"] == "ok" for r in ranked) else 1
