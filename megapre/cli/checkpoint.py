"""`python -m megapre.cli.checkpoint DIR [--iteration N] [--verify]` (also `python -m
megapre.train.checkpoint DIR`, console `megapre-checkpoint`): what a checkpoint holds, as JSON,
and whether every tensor file its metadata names is there with its full size (--verify also
reads every tensor, checks the values are finite and prints each file's sha256).
Exit codes: 0 whole, 2 no such, corrupt or incomplete checkpoint (each problem on stderr)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megapre.cli.common import prog_name
from megapre.train.checkpoint import (CheckpointNotFoundError, CorruptCheckpointError,
                                      SafeFileSystemReader, describe_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog_name("megapre.train.checkpoint"),
        description="Describe a megapre checkpoint (the --save/--load directory or one iter_* "
                    "directory) and check that its files are complete.")
    parser.add_argument("path")
    parser.add_argument("--iteration", type=int, default=None)
    parser.add_argument("--verify", action="store_true",
                        help="also read every tensor (the whole checkpoint into CPU memory), "
                             "check the values are finite, and print each file's sha256")
    return parser


def _verify(info: dict) -> None:
    from megapre.train.checkpoint_verify import read_everything

    path = Path(info["path"])
    files, problems = read_everything(path, SafeFileSystemReader(path).read_metadata())
    info["sha256"] = files
    info["problems"] += problems


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        info = describe_checkpoint(args.path, args.iteration)
        if args.verify and not info["problems"]:
            _verify(info)
    except (CheckpointNotFoundError, CorruptCheckpointError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1))
    for problem in info["problems"]:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
    return 2 if info["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
