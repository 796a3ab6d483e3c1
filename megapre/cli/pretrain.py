"""`torchrun --nproc-per-node N -m megapre.pretrain --model gpt|bert ...` (plain `python -m
megapre.pretrain` is one process). Flags follow Megatron-LM; `--help` lists them by section.
Exit codes: 0 finished (or stopped cleanly by SIGTERM / --exit-duration-in-mins after saving),
2 configuration error (the message names the flag), 1 anything else."""
from __future__ import annotations

import json
import sys

from megapre.model.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    from megapre.cli.flags import parse_config
    from megapre.train.loop import Trainer

    cfg = parse_config(argv)
    try:
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"megapre.pretrain: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    if trainer.logger.enabled:
        print("[megapre] summary " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
