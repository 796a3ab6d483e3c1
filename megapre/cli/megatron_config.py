"""`--config` with a Megatron-LM functional-test YAML (`tests/functional_tests/test_cases/*/
*/model_config.yaml`): its `MODEL_ARGS` mapping becomes command-line words, built the way
Megatron's test harness builds them, so they take exactly the path a typed flag takes.

Harness rules reproduced: `true` is a bare switch, `false`/empty drop the flag, `[a b]` is
several values, `$VAR` / `${VAR}` come from the environment (an unset variable is an error
naming it and its flag, where the harness's envsubst would silently pass an empty string).
`ENV_VARS` and the other sections are ignored with a note.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from megapre.errors import ConfigError

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def is_megatron_config(data: dict) -> bool:
    return "MODEL_ARGS" in data


def _substitute(text: str, flag: str, path: Path, env: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise ConfigError(f"--config {path}: {flag} uses ${{{name}}}, which is not set in the "
                              f"environment (export {name}=... before the run)")
        return env[name]
    return _VAR.sub(value, text)


def _words(flag: str, value: Any, path: Path, env: dict[str, str]) -> list[str]:
    if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
        return [flag]
    if value is False or value is None or value == "":
        return []
    if isinstance(value, list):
        return [flag] + [_substitute(str(v), flag, path, env) for v in value]
    text = _substitute(str(value), flag, path, env).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    # The harness quotes a value with spaces into one word; its flags that take one (a blend in
    # $DATA_BLEND, a batch-size schedule) all take several values, so the words are split here.
    return [flag, *text.split()]


def megatron_argv(data: dict, path: Path, env: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(command-line words of MODEL_ARGS, notes)."""
    env = dict(os.environ) if env is None else env
    args = data.get("MODEL_ARGS")
    if not args:
        raise ConfigError(f"--config {path}: its MODEL_ARGS section is empty: the file describes "
                          "no training run")
    if not isinstance(args, dict):
        raise ConfigError(f"--config {path}: MODEL_ARGS must be a mapping of flags to values")
    words: list[str] = []
    for key, value in args.items():
        flag = str(key)
        if not flag.startswith("--"):
            raise ConfigError(f"--config {path}: MODEL_ARGS key {flag!r} is not a flag "
                              "(expected '--name')")
        words += _words(flag, value, path, env)
    ignored = sorted(k for k in data if k != "MODEL_ARGS")
    notes = [f"--config {path}: read its MODEL_ARGS; ignored {', '.join(ignored)} (set "
             "environment variables yourself)"] if ignored else []
    return words, notes
