"""`python -m megapre.finetune --pretrained-checkpoint CKPT --train-data FILE [--valid-data FILE]
[--test-data FILE] ...` (console script megapre-finetune; under `torchrun` in any TP/PP/DP
layout): fine-tune a pretrained GPT or BERT on a labelled TSV/CSV/JSONL task, with a validation
report after every epoch and a test report at the end (printed, in --metrics-path, and in
SAVE/report.json).

The model and tokenizer come from the pretrained checkpoint. `--load DIR` resumes a fine-tuning
run saved there (its config is reused; flags override). Adaptation: full fine-tuning (default),
--freeze-backbone (linear probe), or LoRA (--lora-rank ...; checkpoints hold only the adapters
and the head).

`python -m megapre.finetune merge-lora --load FINETUNED --save OUT` folds LoRA adapters into the
weights and saves a plain fine-tuned checkpoint.

Exit codes: 0 finished (or stopped cleanly by a signal after saving), 2 bad input (one line
naming the flag, file or line), 1 anything else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megapre.cli.common import prog_name, run_cli

from .flags import FlagParser, add_section_flags, section_values


def build_parser(prog: str) -> argparse.ArgumentParser:
    from megapre.train.finetune_args import FLAGS, TASK_SECTIONS

    p = FlagParser(prog=prog, usage="%(prog)s [merge-lora] [--config FILE] [--FLAG VALUE ...]",
                   description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="YAML or JSON file of flag values")
    add_section_flags(p, "task", TASK_SECTIONS["task"], title="task")
    for section, names in FLAGS.items():
        add_section_flags(p, section, TASK_SECTIONS[section], only=names)
    return p


def resolve_config(args: argparse.Namespace):
    """(config, fine-tuned checkpoint to resume or None, its saved task state). A --load
    directory holding a fine-tuning checkpoint is resumed; otherwise the model comes from
    --pretrained-checkpoint."""
    from megapre.errors import ConfigError
    from megapre.inference.checkpoint_io import saved_config
    from megapre.train.args import apply_settings, load_config_file
    from megapre.train.checkpoint import find_latest, read_config, read_meta, resolve_checkpoint
    from megapre.train.finetune_args import (TASK_SECTIONS, FinetuneConfig, finetune_defaults,
                                             finetune_from_dict)

    given = {s: section_values(args, s) for s in TASK_SECTIONS}
    load = given["checkpoint"].get("load")
    resume = find_latest(load) if load else None
    saved_task: dict = {}
    if resume is not None:
        cfg = finetune_from_dict(read_config(resume) or {})
        saved_task = (read_meta(resume).get("extra") or {}).get("task") or {}
    else:
        pre = given["task"].get("pretrained_checkpoint")
        if pre is None and args.config is None:
            raise ConfigError("--pretrained-checkpoint DIR is required (a megapre pretraining "
                              "checkpoint: the model and tokenizer to fine-tune)")
        cfg = FinetuneConfig()
        if pre is not None:
            cfg = finetune_defaults(saved_config(resolve_checkpoint(pre)))
    if args.config is not None:
        _apply_file(cfg, load_config_file(args.config), args.config, apply_settings)
    for section, values in given.items():
        for name, value in values.items():
            setattr(getattr(cfg, section), name, value)
    if resume is None and cfg.task.pretrained_checkpoint is None:
        raise ConfigError("--pretrained-checkpoint DIR is required (a megapre pretraining "
                          "checkpoint: the model and tokenizer to fine-tune)")
    if resume is None and load:
        print(f"[megapre] --load {load}: no fine-tuning checkpoint there yet; starting from "
              f"--pretrained-checkpoint {cfg.task.pretrained_checkpoint}", flush=True)
    return cfg, resume, saved_task


def _apply_file(cfg, data: dict, path: Path, apply_settings) -> None:
    import dataclasses

    task_fields = {f.name for f in dataclasses.fields(type(cfg.task))}
    rest = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == "task" and isinstance(value, dict):
            for k, v in value.items():
                setattr(cfg.task, k.replace("-", "_"), v)
        elif name in task_fields:
            setattr(cfg.task, name, value)
        else:
            rest[key] = value
    apply_settings(cfg, rest, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge-lora"]:
        from .merge_lora import main as merge

        return merge(argv[1:])
    prog = prog_name("megapre.finetune")
    built: list = []
    rc = run_cli(prog, lambda: _build(argv, prog, built))
    return rc or _train(built[0], prog)


def _build(argv: list[str], prog: str, out: list) -> int:
    args = build_parser(prog).parse_args(argv)
    cfg, resume, saved_task = resolve_config(args)
    from megapre.train.finetune import Finetuner

    out.append(Finetuner(cfg, resume=resume, saved_task=saved_task))
    return 0


def _train(run, prog: str) -> int:
    from megapre.errors import ConfigError
    from megapre.train.checkpoint import CheckpointSaveError

    from .pretrain import _own_message

    try:
        summary = run.train()
    except CheckpointSaveError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as e:
        print(f"{prog}: error: {_own_message(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        run.close()
    if run.logger.enabled:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    import json

    short = {k: v for k, v in summary.items() if k != "reports"}
    for split, report in summary.get("reports", {}).items():
        if report:
            for key in ("accuracy", "macro_f1", "mse", "pearson", "loss"):
                if key in report:
                    short[f"{split}_{key}"] = report[key]
    print("[megapre] summary " + json.dumps(short, sort_keys=True), flush=True)


if __name__ == "__main__":
    sys.exit(main())
