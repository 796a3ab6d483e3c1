"""`python -m megapre.cli.checkpoint DIR [--iteration N]` (also `python -m
megapre.train.checkpoint DIR`, console `megapre-checkpoint`): what a checkpoint holds, as JSON,
without loading a tensor. Exit codes: 0 done, 2 no such / a corrupt checkpoint."""
from __future__ import annotations

import argparse
import json
import sys

from megapre.train.checkpoint import (CheckpointNotFoundError, CorruptCheckpointError,
                                      describe_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megapre-checkpoint",
        description="Describe a megapre checkpoint (the --save/--load directory or one iter_* "
                    "directory) without loading it.")
    parser.add_argument("path")
    parser.add_argument("--iteration", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = describe_checkpoint(args.path, args.iteration)
    except (CheckpointNotFoundError, CorruptCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
