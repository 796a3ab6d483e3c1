"""`megapre-plot RUN/metrics.jsonl [OTHER/metrics.jsonl ...] -o runs.png` (or
`python tools/plot_metrics.py ...`): one PNG of train/valid loss, learning rate, grad norm and
tokens/s from one or several megapre.pretrain metrics files, one line per file, so runs and
sweeps can be compared by eye. Needs matplotlib (`pip install 'megapre[plot]'`).
Exit codes: 0 written, 2 bad input (a missing file, a file without records, no matplotlib)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megapre.errors import ConfigError

from .common import prog_name, run_cli

# (record key, panel title); loss also draws the validation records.
PANELS = (("loss", "loss (train: line, valid: dots)"), ("lr", "learning rate"),
          ("grad_norm", "grad norm"), ("tokens_per_s", "tokens/s"))


@dataclass
class Series:
    """One metrics file: its training and validation records."""

    label: str
    train: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)


def run_label(path: Path) -> str:
    """A sweep's RUN/metrics.jsonl is called by its run directory, other files by their name."""
    return path.parent.name if path.stem == "metrics" and path.parent.name else path.stem


def read_series(path: Path, label: str | None = None) -> Series:
    """Records of a metrics file; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found (megapre.pretrain writes it "
                                "with --metrics-path)")
    series = Series(label or run_label(path))
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "iteration" not in row:
            continue
        if "split" not in row:
            series.train.append(row)
        elif row["split"] == "valid":
            series.valid.append(row)
    if not series.train and not series.valid:
        raise ValueError(f"{path}: no training or validation records to plot")
    return series


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("plotting needs matplotlib: pip install 'megapre[plot]' "
                          "(or pip install matplotlib)") from e
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _xy(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(series: list[Series], out: Path, title: str | None = None) -> Path:
    """Draw the four panels for every series and write `out` (temporary file, then rename)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    for ax, (key, name) in zip(axes.flat, PANELS):
        for i, s in enumerate(series):
            color = f"C{i % 10}"
            ax.plot(*_xy(s.train, key), color=color, label=s.label)
            if key == "loss" and s.valid:
                ax.plot(*_xy(s.valid, key), color=color, linestyle="--", marker="o",
                        label=f"{s.label} (valid)")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix or '.png'}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", type=Path, help="metrics JSONL files (--metrics-path)")
    p.add_argument("-o", "--output", type=Path, default=Path("metrics.png"),
                   help="PNG to write (default: metrics.png)")
    p.add_argument("--labels", nargs="+", help="one label per file (default: the run directory "
                   "for RUN/metrics.jsonl, else the file name)")
    p.add_argument("--title", help="figure title")
    return p


def _plot_files(args: argparse.Namespace) -> int:
    if args.labels is not None and len(args.labels) != len(args.metrics):
        raise ConfigError(f"--labels: {len(args.labels)} labels for {len(args.metrics)} files")
    labels = args.labels or [None] * len(args.metrics)
    out = plot([read_series(p, lab) for p, lab in zip(args.metrics, labels)], args.output,
               args.title)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    prog = prog_name("megapre.cli.plot_metrics")
    args = build_parser(prog).parse_args(argv)
    return run_cli(prog, lambda: _plot_files(args))


if __name__ == "__main__":
    sys.exit(main())
