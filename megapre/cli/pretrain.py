"""`torchrun --nproc-per-node N -m megapre.pretrain --model gpt|bert ...` (plain `python -m
megapre.pretrain` is one process). Flags follow Megatron-LM; `--help` lists them by section.
At the end the summary is printed as a table; its JSON is written beside --metrics-path
(metrics.summary.json). Exit codes: 0 finished (or stopped cleanly by SIGTERM/SIGINT /
--exit-duration-in-mins after saving), 2 configuration error (the message names the flag),
1 anything else (a checkpoint that cannot be written is one line naming the path); under
--rerun-mode validate_results 16 (resume from the saved checkpoint on other hardware) and 17
(a rejected result was diagnosed), as Megatron."""
from __future__ import annotations

import sys

from megapre.cli.common import prog_name, run_cli


def main(argv: list[str] | None = None, unset_defaults: dict | None = None,
         prog: str = "megapre.pretrain") -> int:
    """`unset_defaults`: settings for fields no flag or file gave (Megatron's entry scripts
    default the tokenizer this way; see pretrain_gpt.py)."""
    prog = prog_name(prog)
    built: list = []
    rc = run_cli(prog, lambda: _build(argv, prog, built, unset_defaults))
    return rc or _train(built[0], prog)


def _build(argv: list[str] | None, prog: str, out: list, unset_defaults: dict | None = None
           ) -> int:
    """Parse, validate and set up (input errors here are one line, exit 2). The config is checked
    and its banner printed before torch is imported, so both come within a second or two."""
    import os

    from megapre.cli.flags import parse_config
    from megapre.train.banner import emit, plan_run

    notes: list[str] = []
    cfg = parse_config(argv, prog=prog, notes=notes, unset_defaults=unset_defaults)
    if notes:
        emit([f"note: {n}" for n in notes])
    planned = plan_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    from megapre.train.loop import Trainer

    out.append(Trainer(cfg, planned))
    return 0


def _train(trainer, prog: str) -> int:
    from megapre.errors import ConfigError
    from megapre.train.checkpoint import CheckpointSaveError
    from megapre.train.metrics import format_summary, ordered_summary, write_summary
    from megapre.train.rerun import RerunExit

    try:
        summary = trainer.train()
    except CheckpointSaveError as e:  # disk full, quota, permissions: the message names the path
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as e:  # bad data met mid-run (a sample's ids), maybe in a loader worker
        print(f"{prog}: error: {_own_message(e)}", file=sys.stderr, flush=True)
        return 2
    except RerunExit as e:  # --rerun-mode: 16 resume elsewhere, 17 diagnosed
        return e.halt.exit_code
    finally:
        trainer.close()
    if trainer.logger.enabled:
        summary = ordered_summary(summary)
        print(format_summary(summary), flush=True)
        if trainer.cfg.log.metrics_path:
            write_summary(trainer.cfg.log.metrics_path, summary)
    return 0


def _own_message(error: BaseException) -> str:
    """The error's own message: a DataLoader worker re-raises it in the main process wrapped in
    'Caught X in DataLoader worker process N. Original Traceback ...', whose last line is
    'module.X: message'."""
    text = str(error)
    if not text.startswith("Caught "):
        return text
    last = text.rstrip().splitlines()[-1]
    name = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


if __name__ == "__main__":
    sys.exit(main())
