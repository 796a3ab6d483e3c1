"""Megatron's --use-checkpoint-args: the model's architecture comes from the checkpoint in
--load (its saved run config), not from the command line, so a resumed or fine-tuned run
cannot silently build a different shape. Layout, schedule and data flags stay the command
line's: megapre checkpoints load under any layout. The tokenizer comes from the checkpoint too
when the command line names none (Megatron's --use-tokenizer-model-from-checkpoint-args)."""
from __future__ import annotations

import dataclasses

from megapre.errors import ConfigError

# Settings that do not change the weights' shapes or meaning stay the command line's.
KEEP_FROM_COMMAND_LINE = frozenset({"hidden_dropout", "attention_dropout", "attention_backend",
                                    "bias_gelu_fusion", "init_method_std"})


def apply_checkpoint_args(cfg) -> str | None:
    """Copy the architecture of --load's latest checkpoint into `cfg.model`; returns the note
    to print (what changed, or that --load holds no checkpoint yet)."""
    if cfg.checkpoint.load is None:
        raise ConfigError("--use-checkpoint-args needs --load DIR (the checkpoint whose model "
                          "arguments to use)")
    from .args import from_dict
    from .checkpoint import find_latest, read_config

    path = find_latest(cfg.checkpoint.load)
    if path is None:
        return (f"--use-checkpoint-args: no checkpoint in --load {cfg.checkpoint.load} yet; "
                "using the command line's model arguments")
    saved = read_config(path)
    if saved is None:
        raise ConfigError(f"--use-checkpoint-args: {path} was saved without its run config; "
                          "drop the flag and give the model arguments")
    model = from_dict(saved).model
    changed = []
    for f in dataclasses.fields(model):
        ours, theirs = getattr(cfg.model, f.name), getattr(model, f.name)
        if f.name not in KEEP_FROM_COMMAND_LINE and ours != theirs:
            setattr(cfg.model, f.name, theirs)
            changed.append(f"--{f.name.replace('_', '-')} {theirs} (was {ours})")
    changed += _tokenizer_args(cfg, from_dict(saved))
    what = "; ".join(changed) if changed else "the command line already matched"
    return f"--use-checkpoint-args: model arguments from {path}: {what}"


TOKENIZER_FIELDS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")


def _tokenizer_args(cfg, saved) -> list[str]:
    """As Megatron (which forces them), the checkpoint's tokenizer, but only where the command
    line names none: an explicit --tokenizer-type is never overridden."""
    if cfg.data.tokenizer_type is not None or saved.data.tokenizer_type is None:
        return []
    out = []
    for name in TOKENIZER_FIELDS:
        value = getattr(saved.data, name)
        if value is not None and getattr(cfg.data, name) != value:
            setattr(cfg.data, name, value)
            out.append(f"--{name.replace('_', '-')} {value}")
    return out
