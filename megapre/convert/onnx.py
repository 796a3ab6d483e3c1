"""A megapre checkpoint -> one ONNX file (`megapre-convert onnx`), for ONNX Runtime and other
ONNX consumers.

The checkpoint loads into one process (TP1 PP1, CPU, fp32, whatever layout it was saved in) and
its forward is traced by torch.onnx's exporter (torch.export) in megapre.ops export mode, so the
graph holds only standard ONNX operators (checked: a custom-domain node is an error). Inputs and
outputs follow the Hugging Face / optimum names (megapre/convert/onnx_graph.py), with dynamic
batch and sequence axes. Needs `pip install megapre[onnx]` (onnx, onnxruntime, onnxscript);
importing megapre does not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch

from megapre.errors import ConfigError

from . import onnx_graph

MIN_OPSET = 18
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class OnnxArgs:
    load: Path
    output: Path
    iteration: int | None = None
    with_kv_cache: bool = False
    opset: int = MIN_OPSET
    task_head: bool = False  # insist on a fine-tuned checkpoint's classifier


@dataclasses.dataclass(frozen=True)
class Exported:
    path: Path
    kind: str  # gpt | gpt-kv-cache | bert | classifier
    input_names: list[str]
    output_names: list[str]


def onnx_export(args: OnnxArgs) -> Exported:
    """Trace the checkpoint and write args.output (replaced atomically once complete)."""
    _require_packages()
    _check_args(args)
    from megapre.inference import checkpoint_io

    path = checkpoint_io.resolve(str(args.load), args.iteration)
    with loaded(path, args.task_head) as (model, model_kind, vocab, fine_tuned):
        spec, kind = _spec(model, model_kind, vocab, fine_tuned, args.with_kv_cache)
        program = trace(spec, args.opset)
    write_atomic(program, args.output)
    return Exported(args.output, kind, spec.input_names, spec.output_names)


def _require_packages() -> None:
    import importlib.util

    absent = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if absent:
        raise ConfigError(f"megapre-convert onnx needs {' and '.join(absent)}: pip install "
                          "megapre[onnx]")


def _check_args(args: OnnxArgs) -> None:
    if args.opset < MIN_OPSET:
        raise ConfigError(f"--opset {args.opset}: torch's ONNX exporter writes opset "
                          f"{MIN_OPSET} or later")
    out = args.output
    if out.is_dir():
        raise ConfigError(f"--output {out} is a directory: give a file name (model.onnx)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--output {out}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {out}: directory {parent} is not writable; choose another")


@contextlib.contextmanager
def loaded(path: Path, task_head: bool) -> Iterator[tuple[torch.nn.Module, str, int, bool]]:
    """(model in eval mode, 'gpt' | 'bert', true vocabulary size, fine-tuned?) of checkpoint
    `path` in one CPU process; a fine-tuned checkpoint (task head recorded) opens with its
    head."""
    from megapre.train.checkpoint import read_meta

    fine_tuned = bool((read_meta(path).get("extra") or {}).get("task"))
    if task_head and not fine_tuned:
        raise ConfigError(f"--task-head: {path} is a pretraining checkpoint (no task head "
                          "recorded); export a fine-tuned one (megapre-finetune --save)")
    rt = _open_finetuned(path) if fine_tuned else _open_pretrained(path)
    try:
        model = rt.model.models[0].eval().float()
        yield model, rt.cfg.model.model, rt.tokenizer.vocab_size, fine_tuned
    finally:
        rt.close()


def _single_process(cfg) -> None:
    from .hf import _single_process as layout

    layout(cfg)
    cfg.train.bf16 = cfg.train.fp16 = False


def _open_pretrained(path: Path):
    from megapre.inference import checkpoint_io
    from megapre.model import init
    from megapre.train.runtime import build_runtime

    cfg = checkpoint_io.saved_config(path)
    _single_process(cfg)
    with init.skipped():  # the checkpoint's weights replace them
        rt = build_runtime(cfg)
    try:
        checkpoint_io.load_weights(path, rt)
    except BaseException:
        rt.close()
        raise
    return rt


def _open_finetuned(path: Path):
    from megapre.train.finetune import open_finetuned

    def adjust(cfg) -> None:
        _single_process(cfg)
        cfg.train.micro_batch_size = 1
        cfg.train.global_batch_size = None

    return open_finetuned(path, adjust).runtime


def _spec(model, model_kind: str, vocab: int, fine_tuned: bool, kv_cache: bool
          ) -> tuple[onnx_graph.GraphSpec, str]:
    if kv_cache and (model_kind != "gpt" or fine_tuned):
        what = "a fine-tuned classifier" if fine_tuned else f"a {model_kind.upper()} model"
        raise ConfigError(f"--with-kv-cache is for GPT language models; the checkpoint holds "
                          f"{what}: drop --with-kv-cache")
    if fine_tuned:
        return onnx_graph.classifier_spec(model, vocab, model_kind == "bert"), "classifier"
    if model_kind == "bert":
        return onnx_graph.bert_spec(model, vocab), "bert"
    if kv_cache:
        return onnx_graph.gpt_cache_spec(model, vocab), "gpt-kv-cache"
    return onnx_graph.gpt_spec(model, vocab), "gpt"


def trace(spec: onnx_graph.GraphSpec, opset: int):
    """The torch.onnx.ONNXProgram of spec.module in export mode; refuses a custom-domain
    node."""
    from megapre.ops import export_mode

    dims = {name: torch.export.Dim.AUTO if "+" in name else torch.export.Dim(name)
            for axes in spec.dynamic.values() for name in axes.values()}
    shapes = tuple({axis: dims[name] for axis, name in spec.dynamic[n].items()}
                   for n in spec.input_names)
    if spec.varargs_from is not None:  # torch.export sees *args as one tuple argument
        shapes = (*shapes[:spec.varargs_from], shapes[spec.varargs_from:])
    with export_mode.exporting(), torch.no_grad(), _quiet():
        program = torch.onnx.export(
            spec.module.eval(), spec.inputs, dynamo=True, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=shapes, opset_version=opset,
            verbose=False)
    _name_derived_axes(program.model, spec)
    custom = sorted(custom_domains(program.model))
    if custom:
        raise ConfigError(f"the traced graph uses non-standard operators ({', '.join(custom)}); "
                          "it would not run in a stock ONNX runtime")
    return program


def _name_derived_axes(model, spec: onnx_graph.GraphSpec) -> None:
    """Give the axes the exporter derived (named like s53) their spec names ("past_sequence +
    sequence"), as the exporter names the outputs' derived axes."""
    import onnx_ir as ir

    for value, name in zip(model.graph.inputs, spec.input_names):
        derived = {a: n for a, n in spec.dynamic[name].items() if "+" in n}
        if derived:
            value.shape = ir.Shape([derived.get(a, d) for a, d in enumerate(value.shape)])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the exporter's notes that say nothing about this model (torchvision ops it skips,
    axis names it merges because the inputs share them)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
            yield
    finally:
        registration.setLevel(level)


def custom_domains(model) -> set[str]:
    """`domain::op` of an onnx_ir Model's nodes (subgraphs and functions' bodies included)
    outside the standard ONNX domains; the exporter's own functions count as standard when
    their bodies are."""
    functions = list(model.functions.values())
    local = {f.domain for f in functions}
    nodes = [*model.graph.all_nodes(), *(n for f in functions for n in f.all_nodes())]
    return {f"{n.domain}::{n.op_type}" for n in nodes
            if n.domain not in STANDARD_DOMAINS and n.domain not in local}


def write_atomic(program, out: Path) -> None:
    """Save an ONNXProgram in a temporary directory beside `out`, then move it in (a model past
    protobuf's 2 GB limit keeps its weights in a data file beside it, moved first): nothing
    half-written at `out`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        program.save(tmp / out.name)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == out.name):  # the model last
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
