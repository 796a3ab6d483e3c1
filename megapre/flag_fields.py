"""How config dataclasses declare their command-line flags: a field is a flag
(`lr_warmup_iters` is `--lr-warmup-iters`) and its metadata carries the help text and choices.
Lives at the bottom of the package so every floor's config section (data, train) declares flags
the same way without importing a higher floor; megapre/cli/flags.py turns them into argparse."""
from __future__ import annotations

from dataclasses import field
from typing import Any


def flag_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a flag's help text (and argparse keywords such as `choices`;
    `flag="--name"` gives the flag a name other than the field's, e.g. Megatron's
    `--override-opt_param-scheduler`)."""
    meta = {"help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The flag of a field name: `num_layers` -> `--num-layers`."""
    return "--" + name.replace("_", "-")
