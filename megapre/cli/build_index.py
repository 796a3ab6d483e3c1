"""`python tools/build_index.py` (console `megapre-build-index`): build the GPT sample/shuffle/blend
indices of a run ahead of training.

Takes the training run's data flags (declared once, by megapre.data.args.DataArgs, so every cache
and blend flag of megapre.pretrain works here too), so the cache it fills is exactly the one the
run will hit:

    python tools/build_index.py --data-path 0.3 A_text_document 0.7 B_text_document \\
        --split 969,30,1 --seq-length 2048 --train-iters 10000 --global-batch-size 512 \\
        --eval-iters 10 --eval-interval 1000 --data-cache-path /shared/index-cache
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megapre.data.args import DataArgs
from megapre.data.blend import build_gpt_datasets
from megapre.data.gpt_dataset import GPTDatasetConfig
from megapre.data.split import SPLIT_NAMES, samples_per_split

from .flags import add_section_flags, section_values
from megapre.cli.common import prog_name

# The data flags that decide GPT sample indices (tokenizer and sample-content flags do not).
INDEX_FLAGS = ("data_path", "split", "train_data_path", "valid_data_path", "test_data_path",
               "data_cache_path", "data_cache", "data_cache_node_local", "data_cache_wait",
               "megatron_compatible_blend")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("build_index.py"), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build the GPT sample/shuffle/blend indices of a run ahead of training "
                    "(data flags as megapre.pretrain).")
    add_section_flags(p, "data", DataArgs, only=INDEX_FLAGS)
    g = p.add_argument_group("samples")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--seed", type=int, default=1234)
    steps = g.add_mutually_exclusive_group(required=True)
    steps.add_argument("--train-samples", type=int)
    steps.add_argument("--train-iters", type=int)
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    return p


def num_samples_per_split(args: argparse.Namespace) -> list[int]:
    """Megatron's train_valid_test_num_samples; with --train-samples, the evaluations are those
    of the train_samples // global_batch_size steps it makes."""
    gbs = args.global_batch_size
    if gbs < 1 or args.eval_iters < 0 or args.eval_interval < 1:
        raise ValueError("--global-batch-size and --eval-interval must be >= 1, --eval-iters >= 0")
    iters = args.train_iters if args.train_samples is None else args.train_samples // gbs
    if iters < 0:  # a negative --train-samples gives negative steps too
        raise ValueError("--train-samples/--train-iters must be >= 0")
    counts = samples_per_split(iters, args.eval_interval, args.eval_iters, gbs)
    if args.train_samples is not None:
        counts[0] = args.train_samples
    return counts


def _describe(name: str, dataset) -> list[str]:
    lines = []
    parts = getattr(dataset, "datasets", None)
    if parts is not None:
        lines.append(f"{name:5s} blend      {len(dataset):>12,d} samples  {dataset.cache_status:6s} "
                     f"{dataset.build_seconds:7.2f} s")
        for d, w in zip(parts, dataset.weights):
            lines += ["  " + s for s in _describe(f"{w:.3f}", d)]
        return lines
    epochs = len(dataset.document_index) // max(1, dataset.num_sequences)
    lines.append(f"{name:5s} {dataset.indexed.path_prefix}: {len(dataset):,d} samples, "
                 f"{epochs} epoch(s), {dataset.cache_status} in {dataset.build_seconds:.2f} s"
                 + (f", key {dataset.cache_key[:16]}" if dataset.cache_key else ""))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = DataArgs(**section_values(args, "data"))
    try:
        if not (data.data_path or data.train_data_path):
            raise ValueError("no data: give --data-path (blend) or --train-data-path")
        gpt = GPTDatasetConfig(seq_length=args.seq_length, seed=args.seed, cache=data.cache())
        num_samples = num_samples_per_split(args)
        datasets = build_gpt_datasets(data.blend(), gpt, num_samples)
    except (ValueError, FileNotFoundError, PermissionError, TimeoutError) as e:
        print(f"build_index: error: {e}", file=sys.stderr)
        return 2
    for name, want in zip(SPLIT_NAMES, num_samples):
        dataset = datasets[name]
        if dataset is None:
            print(f"{name:5s} (not built: "
                  f"{'no samples requested' if want == 0 else 'no share in --split'})")
            continue
        print(f"{name}: {want:,d} samples requested")
        for line in _describe(name, dataset):
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
