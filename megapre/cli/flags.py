"""Command-line flags of megapre.pretrain, generated from the config dataclasses of
megapre/train/args.py: each field is a flag (`lr_warmup_iters` is `--lr-warmup-iters`), booleans
that default to False are switches (`--bf16`), booleans that default to True are turned off with
`--no-...` (Megatron's style). `--config FILE` (YAML/JSON) is read first; flags override it."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

from megapre.cli import megatron_flags
from megapre.cli.megatron_config import is_megatron_config, megatron_argv
from megapre.flag_fields import flag
from megapre.train.args import SECTIONS, PretrainConfig, apply_settings, load_config_file


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


def _names(name: str, meta: dict) -> list[str]:
    """The field's explicit `flag` (as spelled, e.g. Megatron's --override-opt_param-scheduler)
    first, and the generated all-dashes form as an alias."""
    return list(dict.fromkeys([meta["flag"], flag(name)])) if "flag" in meta else [flag(name)]


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose 'unrecognized arguments' error suggests the closest flag
    (`--hiden-size`: did you mean `--hidden-size`?). Abbreviations are off, as in Megatron:
    otherwise `--loss-scale 1024` would silently set --loss-scale-window."""

    def __init__(self, *args: Any, megatron_fallback: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # megapre.pretrain's parser: a Megatron flag no table lists is refused by name
        self.megatron_fallback = megatron_fallback

    def error(self, message: str):  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            if self.megatron_fallback:
                megatron_flags.check_unrecognized(message[len(prefix):].split())
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for word in message[len(prefix):].split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.75)
                    if close:
                        hints.append(f"{word.split('=')[0]}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def _default_note(default: Any, help_text: str, switch: bool) -> str:
    """' (default: X)' where it says something: not for None, [], switches (the flag name says
    what it turns on or off) or help that already names its default."""
    if switch or default is None or default == [] or "default" in help_text:
        return ""
    return f" (default: {default})"


def _choices_metavar(choices: tuple) -> str:
    return "{" + ",".join(str(c) for c in choices if c is not None) + "}"


def add_section_flags(parser: argparse.ArgumentParser, section: str, cls: type, *,
                      only: tuple[str, ...] | None = None, title: str | None = None,
                      show_defaults: bool = True) -> None:
    """One flag per field of config dataclass `cls` (or of the fields in `only`), as an argument
    group. Flags not given stay out of the namespace (`section_values`), so a config file, a
    saved checkpoint config or the dataclass default supplies them."""
    group = parser.add_argument_group(title or section)
    annotations = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        kind, is_list = _base_type(annotations[f.name])
        meta = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = _default_note(default, meta["help"], kind is bool) if show_defaults else ""
        kw: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                              "help": meta["help"] + shown}
        if kind is bool:
            name = "no_" + f.name if default else f.name
            action = "store_false" if default else "store_true"
            group.add_argument(*_names(name, meta), action=action, **kw)
            continue
        if is_list:
            kw["nargs"] = "+"
        metavar = f.name.upper()
        if "choices" in meta:
            kw["choices"] = meta["choices"]
            metavar = _choices_metavar(meta["choices"])
        kw["type"] = _none_or(kind) if kind is not str else str
        if "choices" in meta and None in meta["choices"]:
            kw["type"] = _none_or(str)
        group.add_argument(*_names(f.name, meta), metavar=metavar, **kw)


def section_values(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The flags of `section` given on the command line, by field name."""
    prefix = section + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def build_parser(prog: str = "megapre.pretrain") -> argparse.ArgumentParser:
    p = FlagParser(
        prog=prog, usage="%(prog)s [--config FILE] [--FLAG VALUE ...]",
        megatron_fallback=True,
        description="Pretrain a GPT or BERT model with tensor, pipeline and data parallelism. "
                    "Flags follow Megatron-LM; --config reads a YAML/JSON file (megapre's, or a "
                    "Megatron functional-test model_config.yaml) that flags override.",
        formatter_class=argparse.HelpFormatter)  # defaults: add_section_flags
    p.add_argument("--config", type=Path, help="YAML or JSON file of flag values (flat, or by "
                   "section), or a Megatron model_config.yaml (its MODEL_ARGS)")
    for section, cls in SECTIONS.items():
        add_section_flags(p, section, cls)
    taken = {o for a in p._actions for o in a.option_strings}
    megatron_flags.add_megatron_flags(p, taken)
    return p


def _config_path(argv: list[str]) -> Path | None:
    """The last --config of the command line (read before the full parse: a Megatron YAML
    becomes flags that go through it)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=Path)
    return pre.parse_known_args(argv)[0].config


def parse_config(argv: list[str] | None = None, prog: str = "megapre.pretrain",
                 notes: list[str] | None = None,
                 unset_defaults: dict[str, Any] | None = None) -> PretrainConfig:
    """Defaults, then the --config file, then flags. Lines worth telling the user (no-op
    Megatron flags, ignored YAML sections) are appended to `notes`. `unset_defaults` fills
    fields ('data.tokenizer_type') still None after all that, as Megatron's args_defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    notes = [] if notes is None else notes
    cfg = PretrainConfig()
    path = _config_path(argv)
    if path is not None:
        data = load_config_file(path)
        if is_megatron_config(data):
            words, more = megatron_argv(data, path)
            argv = words + argv
            notes += more
        else:
            apply_settings(cfg, data, path)
    megatron_flags.check_refused_words(argv)
    args = build_parser(prog).parse_args(argv)
    for section in SECTIONS:
        for name, value in section_values(args, section).items():
            setattr(getattr(cfg, section), name, value)
    for key, value in (unset_defaults or {}).items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) is None:
            setattr(getattr(cfg, section), name, value)
    if cfg.checkpoint.use_checkpoint_args:
        from megapre.train.checkpoint_args import apply_checkpoint_args
        notes.append(apply_checkpoint_args(cfg))
    note = megatron_flags.noop_note(megatron_flags.collect(args, cfg))
    notes += [note] if note else []
    notes += _ignored_vocab_size(cfg)
    return cfg


def _ignored_vocab_size(cfg: PretrainConfig) -> list[str]:
    """Megatron scripts pass --vocab-size with tokenizers that know their own size (the Llama-3
    example with HuggingFaceTokenizer): dropped with a note, as Megatron ignores it."""
    d = cfg.data
    if d.vocab_size is None or d.tokenizer_type in (None, "NullTokenizer"):
        return []
    size, d.vocab_size = d.vocab_size, None
    return [f"--vocab-size {size} ignored: {d.tokenizer_type} knows its vocabulary size"]
