"""`tools/build_index.py`: build the GPT sample/shuffle/blend indices of a run ahead of training.

Takes the training run's data flags, so the cache it fills is exactly the one the run will hit:

    python tools/build_index.py --data-path 0.3 A_text_document 0.7 B_text_document \\
        --split 969,30,1 --seq-length 2048 --train-iters 10000 --global-batch-size 512 \\
        --eval-iters 10 --eval-interval 1000 --data-cache-path /shared/index-cache
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megapre.data.blend import BlendConfig, build_gpt_datasets
from megapre.data.gpt_dataset import GPTDatasetConfig
from megapre.data.index_cache import CacheConfig
from megapre.data.split import SPLIT_NAMES


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The data flags shared by training and this tool (Megatron names)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="prefixes, or weight/prefix pairs: 0.3 A 0.7 B")
    g.add_argument("--split", default="969,30,1", help="train,valid,test shares of --data-path")
    for name in SPLIT_NAMES:
        g.add_argument(f"--{name}-data-path", nargs="+", help=f"corpora of the {name} split only")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--data-cache-path", default=None,
                   help="index cache directory (default: index-cache/ beside each dataset)")
    g.add_argument("--data-cache-node-local", action="store_true",
                   help="the cache directory is per node: local rank 0 of every node builds")
    g.add_argument("--data-cache-wait", type=float, default=3600.0,
                   help="seconds to wait for another process building the same indices")
    g.add_argument("--no-data-cache", action="store_true", help="build indices in memory, write nothing")
    g.add_argument("--megatron-compatible-blend", action="store_true",
                   help="megatron-core's blend order (drifts up to ~1.7 samples from the weights)")
    return parser


def add_schedule_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("samples per split")
    steps = g.add_mutually_exclusive_group(required=True)
    steps.add_argument("--train-samples", type=int)
    steps.add_argument("--train-iters", type=int)
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    return parser


def num_samples_per_split(args: argparse.Namespace) -> tuple[int, int, int]:
    """Megatron's train_valid_test_num_samples: valid covers every evaluation of the run."""
    gbs = args.global_batch_size
    if gbs < 1 or args.eval_iters < 0 or args.eval_interval < 1:
        raise ValueError("--global-batch-size and --eval-interval must be >= 1, --eval-iters >= 0")
    if args.train_samples is not None:
        train, iters = args.train_samples, args.train_samples // gbs
    else:
        train, iters = args.train_iters * gbs, args.train_iters
    if train < 0:
        raise ValueError("--train-samples/--train-iters must be >= 0")
    evals = (iters // args.eval_interval + 1) * args.eval_iters
    return train, evals * gbs, args.eval_iters * gbs


def configs_from_args(args: argparse.Namespace) -> tuple[BlendConfig, GPTDatasetConfig]:
    cache = CacheConfig(cache_dir=args.data_cache_path, enabled=not args.no_data_cache,
                        node_local=args.data_cache_node_local, wait_timeout_s=args.data_cache_wait)
    blend = BlendConfig(data_path=args.data_path, split=args.split, train_data_path=args.train_data_path,
                        valid_data_path=args.valid_data_path, test_data_path=args.test_data_path,
                        megatron_compatible_blend=args.megatron_compatible_blend)
    return blend, GPTDatasetConfig(seq_length=args.seq_length, seed=args.seed, cache=cache)


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
    lines.append(f"{name:5s} {dataset.indexed.path_prefix}: {len(dataset):,d} samples, {epochs} epoch(s), "
                 f"{dataset.cache_status} in {dataset.build_seconds:.2f} s"
                 + (f", key {dataset.cache_key[:16]}" if dataset.cache_key else ""))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_schedule_args(add_data_args(parser))
    args = parser.parse_args(argv)
    try:
        blend, gpt = configs_from_args(args)
        num_samples = num_samples_per_split(args)
        datasets = build_gpt_datasets(blend, gpt, num_samples)
    except (ValueError, FileNotFoundError, PermissionError, TimeoutError) as e:
        print(f"build_index: error: {e}", file=sys.stderr)
        return 2
    for name, want in zip(SPLIT_NAMES, num_samples):
        dataset = datasets[name]
        if dataset is None:
            print(f"{name:5s} (not built: {'no samples requested' if want == 0 else 'no share in --split'})")
            continue
        print(f"{name}: {want:,d} samples requested")
        for line in _describe(name, dataset):
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
