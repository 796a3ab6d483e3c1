"""Does pretraining pay off? Fine-tune one pretrained megapre BERT and the identical architecture
from random initialization with one recipe, on SST-2 and AG News, over several seeds, and print
test accuracy and macro-F1 as mean +- std beside the TF-IDF baseline (finetune_baseline.py).

    python benchmarks/finetune_study.py --pretrained CKPT [--tasks sst2,agnews,authorship]
        [--seeds 1,2,3] [--modes pretrained,random,lora] [--out DIR] [--json OUT]
        [--authorship-dir DIR]   # the Gutenberg authorship task of tools/make_authorship_task.py
    python benchmarks/finetune_study.py --summarize A.json B.json   # one table from several runs

Every run is `python -m megapre.finetune` in a fresh process (the command is printed), so the
numbers are exactly what a user gets from the CLI; each run's report.json stays in --out.
SST-2's test.tsv is the official GLUE dev set: report it as "SST-2 dev accuracy".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TASKS = {  # files under --data-dir, columns, and the recipe's per-task sequence length
    "sst2": {"train": "sst2/train.tsv", "valid": "sst2/dev.tsv", "test": "sst2/test.tsv",
             "keys": ["--text-key", "sentence", "--label-key", "label"], "seq": 64,
             "test_name": "SST-2 dev (GLUE dev = sst2/test.tsv)"},
    "agnews": {"train": "agnews/train.tsv", "valid": None, "test": "agnews/test.tsv",
               "keys": ["--text-key", "0", "--label-key", "1"], "seq": 128,
               "test_name": "AG News test"},
    "authorship": {"train": "authorship/train.tsv", "valid": None, "test": "authorship/test.tsv",
                   "keys": ["--text-key", "text", "--label-key", "label"], "seq": 128,
                   "test_name": "Gutenberg authorship (held-out books)"},
}
MODES = {"pretrained": [], "random": ["--random-init"],
         "probe": ["--freeze-backbone"], "random-probe": ["--random-init", "--freeze-backbone"],
         "lora": ["--lora-rank", "2", "--lora-alpha", "4"]}  # <= 2% of a 4x128 BERT incl. head


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def recipe(args: argparse.Namespace, task: str) -> list[str]:
    t = TASKS[task]
    return ["--epochs", str(args.epochs), "--micro-batch-size", str(args.micro_batch_size),
            "--lr", str(args.lr), "--lr-warmup-fraction", "0.1", "--weight-decay", "0.01",
            "--seq-length", str(t["seq"]), "--bucket-by-length", "--log-interval", "100",
            "--device", "cpu", *t["keys"]]


def run_one(args: argparse.Namespace, task: str, mode: str, seed: int) -> dict:
    t = TASKS[task]
    data = Path(args.data_dir)
    out = Path(args.out) / f"{task}-{mode}-seed{seed}"
    cmd = [sys.executable, "-m", "megapre.finetune", "--pretrained-checkpoint", args.pretrained,
           "--train-data", str(data / t["train"]), "--test-data", str(data / t["test"]),
           "--seed", str(seed), "--save", str(out), "--metrics-path",
           str(out / "metrics.jsonl"), *recipe(args, task), *MODES[mode]]
    if t["valid"]:
        cmd += ["--valid-data", str(data / t["valid"])]
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{task}/{mode}/seed {seed} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())["test"]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[megapre] summary")]
    trainable = [line for line in proc.stdout.splitlines() if "parameters on this rank train" in line]
    tail = json.loads(summary[-1].split("summary ", 1)[1]) if summary else {}
    return {"task": task, "mode": mode, "seed": seed, "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"], "seconds": time.time() - start,
            "padding_fraction": tail.get("padding_fraction"),
            "trainable": trainable[-1].split("] ", 1)[1] if trainable else None}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            group = [r for r in rows if r["task"] == task and r["mode"] == mode]
            if not group:
                continue
            acc = [100 * r["accuracy"] for r in group]
            f1 = [100 * r["macro_f1"] for r in group]
            out.append({"task": task, "mode": mode, "runs": len(group),
                        "accuracy_mean": statistics.mean(acc),
                        "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                        "macro_f1_mean": statistics.mean(f1),
                        "minutes_per_run": statistics.mean(r["seconds"] for r in group) / 60})
    return out


def print_table(summary: list[dict]) -> None:
    print(f"\n{'task':<8} {'init':<11} {'runs':>4} {'accuracy':>16} {'macro-F1':>9} "
          f"{'min/run':>8}")
    for s in summary:
        print(f"{s['task']:<8} {s['mode']:<11} {s['runs']:>4} "
              f"{s['accuracy_mean']:>9.2f} +- {s['accuracy_std']:<4.2f} "
              f"{s['macro_f1_mean']:>9.2f} {s['minutes_per_run']:>8.1f}")
    by = {(s["task"], s["mode"]): s for s in summary}
    for task in dict.fromkeys(s["task"] for s in summary):
        if (task, "pretrained") in by and (task, "random") in by:
            gain = by[task, "pretrained"]["accuracy_mean"] - by[task, "random"]["accuracy_mean"]
            print(f"{task}: pretrained - random = {gain:+.2f} accuracy points "
                  f"({TASKS[task]['test_name']})")


def merged(paths: list[str]) -> int:
    """One table from the --json files of several invocations (e.g. the inits run apart)."""
    rows = [r for path in paths for r in json.loads(Path(path).read_text())["runs"]]
    print_table(summarize(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--summarize"]:
        if len(argv) < 2:
            raise SystemExit("--summarize JSON [JSON ...]: give the --json files of earlier runs")
        return merged(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", required=True, help="megapre BERT pretraining checkpoint")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--tasks", default="sst2,agnews")
    p.add_argument("--modes", default="pretrained,random")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="finetune_study")
    p.add_argument("--json", help="write every run and the summary here")
    p.add_argument("--authorship-dir", help="train.tsv/test.tsv of tools/make_authorship_task.py "
                   "(the task 'authorship'; default DATA_DIR/authorship)")
    args = p.parse_args(argv)
    if args.authorship_dir:
        for split in ("train", "test"):
            TASKS["authorship"][split] = str(Path(args.authorship_dir).resolve() / f"{split}.tsv")
    for task in args.tasks.split(","):
        if task not in TASKS:
            p.error(f"--tasks: unknown {task!r}; choose from {','.join(TASKS)}")
        missing = [f for f in (TASKS[task]["train"], TASKS[task]["test"])
                   if not (Path(args.data_dir) / f).is_file()]
        if missing:
            hint = (" (build it: python tools/make_authorship_task.py ... --out-dir DIR, then "
                    "--authorship-dir DIR)" if task == "authorship" else "")
            p.error(f"--tasks {task}: {Path(args.data_dir) / missing[0]} does not exist{hint}")
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"CPU: {cpu_name()}; torch threads: {threads}; recipe: {args.epochs} epochs, micro-batch "
          f"{args.micro_batch_size}, lr {args.lr} (10% warmup, linear decay), bucketed batches",
          flush=True)
    rows = []
    for task in args.tasks.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for mode in args.modes.split(","):
                rows.append(run_one(args, task, mode, seed))
                r = rows[-1]
                print(f"  {task} {mode} seed {seed}: accuracy {100 * r['accuracy']:.2f} "
                      f"macro-F1 {100 * r['macro_f1']:.2f} ({r['seconds'] / 60:.1f} min) "
                      f"{r['trainable'] or ''}", flush=True)
    summary = summarize(rows)
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "summary": summary,
                                               "cpu": cpu_name()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
