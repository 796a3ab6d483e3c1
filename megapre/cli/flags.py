"""Command-line flags of megapre.pretrain, generated from the config dataclasses of
megapre/train/args.py: each field is a flag (`lr_warmup_iters` is `--lr-warmup-iters`), booleans
that default to False are switches (`--bf16`), booleans that default to True are turned off with
`--no-...` (Megatron's style). `--config FILE` (YAML/JSON) is read first; flags override it."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from megapre.train.args import SECTIONS, PretrainConfig, apply_settings, flag, load_config_file


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of an annotation like `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megapre.pretrain", usage="%(prog)s [--config FILE] [--FLAG VALUE ...]",
        description="Pretrain a GPT or BERT model with tensor, pipeline and data parallelism. "
                    "Flags follow Megatron-LM; --config reads a YAML/JSON file that flags override.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML or JSON file of flag values (flat, or by section)")
    hints = typing.get_type_hints
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(section)
        annotations = hints(cls)
        for f in dataclasses.fields(cls):
            kind, is_list = _base_type(annotations[f.name])
            meta = dict(f.metadata)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                                  "help": f"{meta['help']} (default: {default})"}
            if kind is bool:
                if default:
                    group.add_argument(flag("no_" + f.name), action="store_false", **kw)
                else:
                    group.add_argument(flag(f.name), action="store_true", **kw)
                continue
            if is_list:
                kw["nargs"] = "+"
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            kw["type"] = _none_or(kind) if kind is not str else str
            if "choices" in meta and None in meta["choices"]:
                kw["type"] = _none_or(str)
            group.add_argument(flag(f.name), metavar=f.name.upper(), **kw)
    return p


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    """Defaults, then --config file, then flags."""
    args = build_parser().parse_args(argv)
    cfg = PretrainConfig()
    if getattr(args, "config", None) is not None:
        apply_settings(cfg, load_config_file(args.config), args.config)
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    return cfg
