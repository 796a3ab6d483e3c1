"""Reading a training checkpoint for inference: its saved run config (config.json, written by
megapre.train.checkpoint with every save) and its weights, into a model of any layout.
Nothing is unpickled: the config is JSON and the weights come through the checkpoint module's
DCP reader."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from megapre.model.config import ConfigError
from megapre.train.args import PretrainConfig, from_dict
from megapre.train.distill_args import DistillArgs


def _checkpoint_module():
    try:
        from megapre.train import checkpoint
    except ImportError as e:  # pragma: no cover - only in an install without checkpoints
        raise ConfigError(f"this megapre has no checkpoint support ({e}); --load cannot work") from e
    return checkpoint


def resolve(load: str, iteration: int | None = None) -> Path:
    """The checkpoint directory of --load (the latest one, or --iteration's); FileNotFoundError
    with what the directory holds when there is none."""
    return _checkpoint_module().resolve_checkpoint(load, iteration)


def saved_config(path: Path) -> PretrainConfig:
    """The PretrainConfig the checkpoint at `path` was trained with."""
    file = path / _checkpoint_module().CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{file} is missing: the checkpoint was saved without its run config, so "
                          "the model shape is unknown (save it with megapre.pretrain --save)")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the run config {file}: {e}") from e
    cfg = from_dict(data)
    cfg.distill = DistillArgs()  # a distilled student runs without its teacher
    return cfg


def load_weights(path: Path, runtime) -> dict:
    """Model weights only (no optimizer, no RNG restore) into `runtime.model`; returns the
    checkpoint's info dict (iteration, consumed_samples, ...)."""
    return _checkpoint_module().load_checkpoint(path, runtime.model, None, runtime.mesh,
                                                load_rng=False, tracker=runtime.tracker)


def check_tokenizer(path: Path, tokenizer, allow: bool) -> None:
    """Refuse a tokenizer other than the one the checkpoint was trained with (a moved or edited
    --vocab-file/--merge-file/--tokenizer-model) unless `allow`; warnings go to stderr once
    (rank 0)."""
    from megapre.data.notify import is_main_process
    from megapre.train.checkpoint_tokenizer import check_tokenizer as check

    module = _checkpoint_module()
    note = check(module.read_meta(path).get("tokenizer"), tokenizer, allow, str(path))
    if note and is_main_process():
        print(f"warning: {note}", file=sys.stderr, flush=True)
