"""Reading a Megatron-LM / megatron-core checkpoint without running Megatron: its run args and
its model tensors under megatron-core's per-layer names (`decoder.layers.{i}....`).

Two formats are read (facts of the format, found by saving them):
  torch_dist  iter_XXXXXXX/metadata.json {"sharded_backend": "torch_dist"}, .metadata, *.distcp,
              common.pt; layer tensors stored stacked ([num_layers, ...] under
              `decoder.layers.<name>`), `_extra_state` as byte blobs.
  legacy      iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt: one pickle per rank holding
              'args' (argparse.Namespace) and 'model' (that rank's state dict).
Pickles are opened with torch's weights_only loader: argparse.Namespace is rebuilt, every other
class a file names is replaced by an inert stand-in, so nothing in the file runs code."""
from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megapre.model.config import ConfigError
from megapre.train import checkpoint as ckpt

LATEST = "latest_checkpointed_iteration.txt"
LEGACY_FILE = "model_optim_rng.pt"
RANK_DIR = re.compile(r"^mp_rank_(\d\d)(?:_(\d\d\d))?$")


def is_megatron_dir(path: Path) -> bool:
    """A Megatron-LM checkpoint root or iteration directory (for --load's message)."""
    if _is_iteration(path):
        return True
    try:
        text = (path / LATEST).read_text().strip()
    except (OSError, ValueError):  # no file, or not text: megapre's own check names it
        return False
    name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else ""
    return bool(name) and _is_iteration(path / name)


def _is_iteration(path: Path) -> bool:
    return (path / "metadata.json").is_file() or bool(_rank_dirs(path))


def _rank_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if RANK_DIR.match(p.name) and p.is_dir())


def resolve(load: Path, iteration: int | None) -> Path:
    """The iteration directory to read: --iteration, else latest_checkpointed_iteration.txt."""
    if not load.is_dir():
        raise ConfigError(f"--load {load}: no such directory")
    if iteration is not None:
        path = load / f"iter_{iteration:07d}"
        if not path.is_dir():
            raise ConfigError(f"--load {load}: no iteration {iteration} ({path.name} missing)")
        return path
    if _is_iteration(load):
        return load  # an iteration directory itself
    try:
        text = (load / LATEST).read_text().strip()
    except ValueError:
        raise ConfigError(f"{load / LATEST}: not an iteration number (not text)") from None
    except OSError:
        raise ConfigError(f"--load {load}: not a Megatron checkpoint (no {LATEST}, metadata.json "
                          "or mp_rank_* directories); give --iteration N or the iter_XXXXXXX "
                          "directory") from None
    if text == "release":
        return load / "release"
    if not text.isdigit():
        raise ConfigError(f"{load / LATEST}: {text!r} is not an iteration number")
    path = load / f"iter_{int(text):07d}"
    if not path.is_dir():
        raise ConfigError(f"{load / LATEST} names iteration {int(text)} but {path.name} is "
                          "missing")
    return path


def format_of(path: Path) -> str:
    """'torch_dist' or 'legacy'; other sharded backends (zarr, ...) are refused by name."""
    meta = path / "metadata.json"
    if meta.is_file():
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{meta}: unreadable ({e})") from None
        if backend != "torch_dist":
            raise ConfigError(f"{meta}: sharded_backend {backend!r} is not supported; "
                              "mcore-import reads torch_dist and legacy model_optim_rng.pt")
        return "torch_dist"
    if _rank_dirs(path):
        return "legacy"
    if (path / "meta.json").is_file():
        raise ConfigError(f"{path} is a megapre checkpoint already: load it with --load directly")
    raise ConfigError(f"{path}: unknown checkpoint format (neither metadata.json of "
                      "dist_checkpointing nor mp_rank_*/model_optim_rng.pt)")


# -- pickles -------------------------------------------------------------------------------------
class _Inert:
    """Stands in for any class a pickle names except argparse.Namespace: keeps its arguments and
    state, runs nothing."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state


def load_pickle(path: Path) -> dict:
    """A torch.save file through weights_only loading with Namespace allowed, the rest inert."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        allowed = [(argparse.Namespace if n == "argparse.Namespace" else _Inert, n)
                   for n in names]
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError,
            AttributeError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable ({_reason(e)})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _reason(e: BaseException) -> str:
    """The informative line of torch's (long, multi-line) load errors."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    return next((x for x in lines if "GLOBAL" in x or x.lower().startswith("error")),
                lines[0])[:200]


def args_of(state: dict) -> dict | None:
    args = state.get("args")
    return vars(args) if isinstance(args, argparse.Namespace) else None


# -- torch_dist ----------------------------------------------------------------------------------
class _Unpickler(ckpt._MetadataUnpickler):
    """dist_checkpointing's .metadata also holds the save plans (torch's planner records)."""

    PLANNER = {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"}

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.planner" and name in self.PLANNER:
            return pickle.Unpickler.find_class(self, module, name)
        return super().find_class(module, name)


class _Reader(ckpt.SafeFileSystemReader):
    unpickler = _Unpickler


def read_torch_dist(path: Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(args, tensors by per-layer name); stacked layer tensors are split per layer."""
    common = path / "common.pt"
    args = args_of(load_pickle(common)) if common.is_file() else None
    reader = _Reader(path)
    try:
        metadata = reader.read_metadata()
        targets = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
                   for k, m in metadata.state_dict_metadata.items()
                   if hasattr(m, "size") and "_extra_state" not in k}
        dcp.load(targets, storage_reader=reader, no_dist=True)
    except ConfigError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise ConfigError(f"{path}: cannot read the tensors ({_first_line(e)})") from None
    return args, _unstack(targets)


def _first_line(e: BaseException) -> str:
    """The last line of a (per-rank, multi-line) DCP error: the exception itself."""
    text = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return (text[-1] if text else type(e).__name__)[:200]


def _unstack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        if key.startswith("decoder.layers.") and not key[len("decoder.layers."):][:1].isdigit():
            rest = key[len("decoder.layers."):]
            for i, layer in enumerate(t.unbind(0)):
                out[f"decoder.layers.{i}.{rest}"] = layer
        else:
            out[key] = t
    return out


# -- legacy --------------------------------------------------------------------------------------
def read_legacy(path: Path, glu: bool | None = None) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(args, tensors) from mp_rank_TT[_PPP] files: tensor-parallel shards are joined, and the
    layers of each chunk renumbered after the chunks before it. A stage holds one chunk
    ('model'), or with virtual pipeline stages several ('model0', 'model1', ...): chunk v of
    stage p is the (v * stages + p)-th run of layers (Megatron's interleaved assignment)."""
    stages: dict[int, list[Path]] = {}
    for r in _rank_dirs(path):
        tp, pp = RANK_DIR.match(r.name).groups()
        stages.setdefault(int(pp or 0), []).append(r)
    args, chunks = None, {}
    for pp in sorted(stages):
        stage_args, shards = _read_stage(stages[pp])
        args = args or stage_args
        glu_here = bool(args and args.get("swiglu")) if glu is None else glu
        for v in range(len(shards[0])):
            parts = [rank[v] for rank in shards]
            chunks[(v, pp)] = parts[0] if len(parts) == 1 else join_tp(parts, glu_here)
    if len({v for v, _ in chunks}) * len(stages) != len(chunks):
        raise ConfigError(f"{path}: the pipeline stages hold different numbers of virtual "
                          "stages (model0, model1 ...); the checkpoint is incomplete")
    merged, offset = {}, 0
    for key in sorted(chunks):  # (v, pp): every stage's chunk 0, then every stage's chunk 1 ...
        renumbered, count = _renumber(chunks[key], offset)
        merged.update(renumbered)
        offset += count
    return args, merged


def _read_stage(ranks: list[Path]) -> tuple[dict | None, list[list[dict[str, torch.Tensor]]]]:
    """The run args and, per tensor-parallel rank, the tensors of each of its model chunks."""
    args, models = None, []
    for r in sorted(ranks):
        f = r / LEGACY_FILE
        if not f.is_file():
            raise ConfigError(f"{r}: {LEGACY_FILE} missing")
        state = load_pickle(f)
        args = args or args_of(state)
        names = ["model"] if "model" in state else sorted(
            (k for k in state if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
        if not names or not all(isinstance(state[n], dict) for n in names):
            raise ConfigError(f"{f}: no 'model' state dict (nor model0, model1 ... of virtual "
                              "pipeline stages)")
        if models and len(names) != len(models[0]):
            raise ConfigError(f"{f}: {len(names)} model chunks, but the stage's first rank has "
                              f"{len(models[0])}")
        models.append([{k: v for k, v in state[n].items() if isinstance(v, torch.Tensor)}
                       for n in names])
    return args, models


LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _renumber(tensors: dict[str, torch.Tensor], offset: int
              ) -> tuple[dict[str, torch.Tensor], int]:
    """A pipeline stage numbers its layers from 0: shift them by the layers before it."""
    out, seen = {}, set()
    for key, t in tensors.items():
        m = LAYER.match(key)
        if m:
            seen.add(int(m.group(1)))
            key = f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}"
        out[key] = t
    return out, len(seen)


def join_tp(shards: list[dict[str, torch.Tensor]], glu: bool) -> dict[str, torch.Tensor]:
    """One state from tensor-parallel shards: column-parallel weights along dim 0 (a GLU fc1's
    shard is [gate_shard; up_shard]), row-parallel weights along dim 1, the rest replicated."""
    out = {}
    for key, first in shards[0].items():
        parts = [s[key] for s in shards]
        if key.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight",
                         "output_layer.weight")):
            out[key] = torch.cat(parts, 0)
        elif key.endswith(("linear_fc1.weight", "linear_fc1.bias")):
            if glu:
                halves = [p.chunk(2, 0) for p in parts]
                out[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
            else:
                out[key] = torch.cat(parts, 0)
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            out[key] = torch.cat(parts, 1)
        else:
            out[key] = first
    return out
