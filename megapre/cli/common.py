"""What the programs that run a checkpoint (megapre.evaluate, megapre.generate) share on the
command line: which checkpoint, the layout and device to run it in, tokenizer file overrides,
JSON output, and error reporting (a bad input exits 2 with one line naming the flag or file, no
traceback)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from megapre.data.notify import is_main_process as is_main_rank

if TYPE_CHECKING:  # torch and the config load only where used: light tools start fast
    import torch

    from megapre.train.args import PretrainConfig


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not None/False/[], not when the help
    text already explains it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        quiet = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if quiet or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def checkpoint_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser for a program that runs a checkpoint: its first docstring paragraph as the
    description, and the checkpoint, layout and tokenizer-file flags."""
    parser = argparse.ArgumentParser(prog=prog_name(prog), description=doc.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    add_common_args(parser)
    return parser


def add_common_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint and layout")
    g.add_argument("--load", required=True, metavar="DIR",
                   help="checkpoint directory (a --save directory, or one iter_XXXXXXX inside it)")
    g.add_argument("--iteration", type=int, help="load this iteration instead of the latest")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="TP",
                   help="TP size of this job (any size that divides the model's heads)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="PP",
                   help="PP size of this job (any size that divides the layers)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: this rank's GPU when there is one, else the CPU")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast instead of fp32")
    g.add_argument("--output-json", type=Path, metavar="FILE", help="also write the results here")
    t = parser.add_argument_group("tokenizer files (default: the paths the run was trained with)")
    t.add_argument("--vocab-file", help="vocabulary file (when it moved since training)")
    t.add_argument("--merge-file", help="BPE merges file")
    t.add_argument("--tokenizer-model", help="SentencePiece model or tokenizer.json")
    t.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="run even when the tokenizer's fingerprint differs from the one the "
                        "checkpoint was trained with")


def apply_common(cfg: "PretrainConfig", args: argparse.Namespace) -> "PretrainConfig":
    """Layout, device, precision and tokenizer paths of this job over the checkpoint's config."""
    p = cfg.parallel
    p.tensor_model_parallel_size = args.tensor_model_parallel_size
    p.pipeline_model_parallel_size = args.pipeline_model_parallel_size
    p.context_parallel_size = 1  # a run trained with context parallelism evaluates without it
    p.even_pipeline()
    p.num_distributed_optimizer_instances = 1  # a training layout: no optimizer here
    p.pipeline_schedule = "1f1b"
    cfg.train.device = args.device
    cfg.train.bf16, cfg.train.fp16 = bool(args.bf16), False
    for name in ("vocab_file", "merge_file", "tokenizer_model"):
        if getattr(args, name) is not None:
            setattr(cfg.data, name, getattr(args, name))
    return cfg


def autocast(device: "torch.device", bf16: bool):
    import torch

    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prog_name(module: str) -> str:
    """The program's name in usage and error lines: the console script's (`megapre-sweep`) when
    run as one, `tools/NAME.py` when run from a checkout's tools/, else the module (`python -m`)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    base = os.path.basename(argv0)
    if base.startswith("megapre-"):
        return base
    if base.endswith(".py") and os.path.basename(os.path.dirname(os.path.abspath(argv0))) == "tools":
        return f"tools/{base}"
    return module


def emit_record(record: dict, output_json: Path | None) -> None:
    """A program's result: one sorted JSON line on stdout, and the same object in --output-json.
    Call it on the rank that reports."""
    import json

    print(json.dumps(record, sort_keys=True), flush=True)
    if output_json is not None:
        write_json_atomic(output_json, record)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (flags, files, checkpoints), not a bug."""
    from megapre.errors import ConfigError

    errors: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)
    try:
        from megapre.train.checkpoint import CorruptCheckpointError
    except ImportError:  # pragma: no cover - an install without checkpoints
        return errors
    return (*errors, CorruptCheckpointError)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; input errors become one 'prog: error: ...' line on stderr and exit code 2."""
    try:
        return body()
    except _input_errors() as e:
        line = f"{prog}: error: {e}"
        if is_main_rank():
            print(line, file=sys.stderr, flush=True)
        _tell_torchrun(line)
        return 2


def _tell_torchrun(line: str) -> None:
    """Under torchrun, put the one-line error in the worker's error file, so torchrun's failure
    report (which it prints for any non-zero exit) quotes it instead of a link about tracebacks."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                        "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        write_json_atomic(Path(path), data)
