"""Checkpoints with torch.distributed.checkpoint (DCP): layout-independent, atomic, exact resume.

    save_dir/
      latest_checkpointed_iteration.txt   "100" (Megatron's name), replaced atomically, last
      .megapre-save.lock                  the run saving here (checkpoint_lock.py), while it runs
      iter_0000100/
        .metadata, __*_*.distcp           DCP: model + optimizer state under global names
        meta.json                         iteration, layout, model config, tokenizer, extra
                                          (the Trainer's: lr schedule, loss scaler; JSON only)
        config.json                       the resolved PretrainConfig of the run
        rng/rank_<pp>_<dp>_<tp>.pt        per-rank random streams (tensors only)

A save writes into `iter_0000100.tmp-<nonce>`, renames it to `iter_0000100` once every rank's
data and DCP's metadata are on disk, and only then points `latest` at it: a job killed at any
moment resumes from the previous complete checkpoint. `async_save=True` writes in a background
thread (DCP stages a copy first, so training may continue); the next save, or
`wait_for_pending_save()` before exit, finishes it.

Loading never unpickles arbitrary objects: tensors come from DCP's tensor files, the metadata
pickle is read with an allow-list of DCP's own record types, RNG files with
`torch.load(weights_only=True)`, everything else is JSON. The layout mapping lives in
state_dict.py; the random streams in rng_state.py; whether a checkpoint fits the model in
checkpoint_fit.py; the file checks of the inspector in checkpoint_verify.py. A save that fails
(a full disk) removes its temporary directory and names the path; the previous checkpoints are
untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import secrets
import shutil
import sys
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from megapre.errors import ConfigError
from megapre.model.config import TransformerConfig
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.random import RNGTracker

from . import rng_state
from .checkpoint_fit import (STRICTNESS_FLAG, CheckpointMismatchError, FitReport,
                             architecture_diff, check_strictness, mismatch_message)
from .checkpoint_names import (CONFIG_FILE, DCP_METADATA, ITER_DIR, LATEST_FILE, META_FILE,
                               RNG_DIR)
from .state_dict import (MODEL_PREFIX, OPTIM_PREFIX, LoadTarget, load_targets, optimizer_state_names,
                         save_state_dict)

EXTRA_PREFIX = "extra."
FORMAT = "megapre-dcp-1"
_LEFTOVER = re.compile(r"^iter_\d{7,}\.(tmp|old)-[0-9a-f]+$")


class CheckpointNotFoundError(FileNotFoundError):
    """No (complete) checkpoint where one was asked for."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, ...); the message names the path and the reason,
    the previous checkpoints are intact."""


class CorruptCheckpointError(ConfigError, RuntimeError):
    """A checkpoint directory is incomplete or damaged (bad input: the programs exit 2 with one
    line; still a RuntimeError for callers that catch it as one)."""


def checkpoint_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


# -- small collective helpers ------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_writer() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when torch.distributed is not up: that is the
    intent here, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _shared_nonce(mesh: ParallelMesh) -> str:
    """A random name part that every rank agrees on (rank 0 draws it)."""
    value = torch.tensor([secrets.randbits(48) if _is_writer() else 0], dtype=torch.int64,
                         device=mesh.device)
    if _distributed():
        dist.broadcast(value, src=0)
    return f"{int(value):012x}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


# -- extra state: JSON, with tensors stored by DCP -------------------------------------------------
def _encode_extra(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        key = EXTRA_PREFIX + path
        tensors[key] = value.detach().cpu().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"checkpoint extra state {path or '<root>'}: key {k!r} is not a "
                                "string (the state is stored as JSON)")
        return {k: _encode_extra(v, f"{path}.{k}" if path else k, tensors)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_extra(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint extra state {path!r} is a {type(value).__name__}; only JSON "
                    "values (dict, list, str, int, float, bool, None) and tensors can be saved")


def _decode_extra(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _decode_extra(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_extra(v, tensors) for v in value]
    return value


# -- saving ------------------------------------------------------------------------------------
class _PendingSave:
    """The one asynchronous save a process may have in flight."""

    def __init__(self) -> None:
        self.future: Future | None = None
        self.published = threading.Event()
        self.error: BaseException | None = None
        self.group: dist.ProcessGroup | None = None  # gloo group used only by async saves


_PENDING = _PendingSave()


def wait_for_pending_save(barrier: bool = False) -> None:
    """Block until an asynchronous save (if any) is written and published. Call it before the
    process exits (the run's last checkpoint is otherwise lost); `save_checkpoint` calls it."""
    fut, _PENDING.future = _PENDING.future, None
    if fut is not None:
        _PENDING.published.wait()
        error, _PENDING.error = _PENDING.error, None
        if isinstance(error, CheckpointSaveError):
            raise error
        fut.result()
        if error is not None:
            raise RuntimeError(f"publishing the asynchronous checkpoint failed: {error}") from error
    if barrier:
        _barrier()


class _SnapshotStager:
    """DCP async stager: a CPU copy of every tensor (DTensors keep their mesh and placements),
    taken before `async_save` returns so training may change the live tensors. DCP's default
    stager deep-copies CPU DTensors, which fails for views of parameters."""

    should_synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {k: _snapshot(v) for k, v in state_dict.items()}

    def synchronize_staging(self) -> None:
        return None

    def close(self) -> None:
        return None


def _snapshot(value: torch.Tensor) -> torch.Tensor:
    if isinstance(value, DTensor):
        local = value.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                                  shape=value.shape, stride=value.stride())
    return value.detach().to("cpu", copy=True)


def _async_group() -> dist.ProcessGroup | None:
    """A dedicated gloo group: the background writer's collectives must not interleave with the
    training step's on the default group (and async DCP needs a CPU backend)."""
    if not _distributed():
        return None
    if _PENDING.group is None:
        _PENDING.group = dist.new_group(backend="gloo")
    return _PENDING.group


def _models_and_cfg(model) -> tuple[list[torch.nn.Module], TransformerConfig, str]:
    """(model pieces, TransformerConfig, kind) of a ParallelModel or a bare GPT/BERT model."""
    if hasattr(model, "models") and hasattr(model, "adapter"):
        return list(model.models), model.adapter.cfg, model.adapter.kind
    kind = "bert" if hasattr(model, "encoder") else "gpt"
    return [model], model.cfg, kind


def find_tracker(model) -> RNGTracker | None:
    """The RNG tracker the model's layers draw from (None when built without one)."""
    for module in model.modules():
        tracker = getattr(module, "tracker", None)
        if isinstance(tracker, RNGTracker):
            return tracker
    return None


def _layout(mesh: ParallelMesh) -> dict[str, Any]:
    """The layout that wrote a checkpoint (RNG states are restored only in the same one); "cp"
    appears only under context parallelism, so CP-free checkpoints compare as before."""
    out = {"tp": mesh.tp_size, "pp": mesh.pp_size, "dp": mesh.dp_size,
           "vp": mesh.virtual_pipeline, "world": mesh.world_size}
    if mesh.cp_size > 1:
        out["cp"] = mesh.cp_size
    return out


def save_checkpoint(save_dir: str | os.PathLike, iteration: int, model, optimizer=None,
                    mesh: ParallelMesh | None = None, *, consumed_samples: int = 0,
                    config: dict | None = None, extra: dict | None = None,
                    tracker: RNGTracker | None = None, async_save: bool = False,
                    keep_last: int | None = None, tokenizer: dict | None = None,
                    select: Callable[[str], bool] | None = None,
                    retain_interval: int | None = None) -> Path:
    """Save model, optimizer (None: weights only), per-rank RNG states (of the default
    generators, `tracker` (found in the model when not given), numpy and `random`), the
    consumed-samples count, `config` (the resolved PretrainConfig dict, written as config.json)
    `extra` (JSON values and tensors: loss-scaler state, skip counters, ...) and `tokenizer` (its
    describe(), checked against the tokenizer of a later load). `select` keeps only the parameters
    whose names it accepts (and their optimizer state): LoRA adapters saved alone.
    `keep_last` / `retain_interval`: see `prune_checkpoints`. Collective: every rank calls it.

    Returns the final directory (complete once this returns, or, with `async_save`, once the
    next save or `wait_for_pending_save()` returns)."""
    if not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"checkpoint iteration must be a non-negative integer, got {iteration!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"--keep-last must be a positive integer, got {keep_last!r}")
    mesh = mesh or model.mesh
    models, cfg, kind = _models_and_cfg(model)
    tracker = tracker or find_tracker(model)
    extra_tensors: dict[str, torch.Tensor] = {}
    extra_json = _encode_extra(dict(extra or {}), "", extra_tensors)
    config_json = json.dumps(config, indent=1) if config is not None else None
    wait_for_pending_save()

    root = Path(save_dir)
    final = checkpoint_dir(root, iteration)
    nonce = _shared_nonce(mesh)
    tmp = root / f"{final.name}.tmp-{nonce}"
    meta = {"format": FORMAT, "iteration": iteration, "model_kind": kind,
            "model_config": dataclasses.asdict(cfg), "layout": _layout(mesh),
            "has_optimizer": optimizer is not None, "consumed_samples": int(consumed_samples),
            "extra": extra_json, "torch_version": torch.__version__, "tokenizer": tokenizer}
    try:
        _write_side_files(tmp, mesh, tracker, meta, config_json)
        state = save_state_dict(models, optimizer, mesh, cfg, select)
        state.update(extra_tensors)
        writer = dcp.FileSystemWriter(tmp, thread_count=1, sync_files=True)
        if not async_save:
            with _quiet_single_process():
                dcp.save(state, storage_writer=writer, no_dist=not _distributed())
            if _is_writer():
                _publish(root, tmp, final, iteration, (keep_last, retain_interval), nonce)
            _barrier()
            return final
    except (OSError, CheckpointException) as e:
        failed = _save_failed(e, tmp, iteration)
        if failed is e:
            raise
        raise failed from e

    _PENDING.published.clear()
    _PENDING.error = None
    with _quiet_single_process():
        future = dcp.async_save(state, storage_writer=writer, process_group=_async_group(),
                                async_stager=_SnapshotStager(), no_dist=not _distributed())

    def on_written(fut: Future) -> None:
        try:
            if fut.exception() is not None:
                _PENDING.error = _save_failed(fut.exception(), tmp, iteration)
            elif _is_writer():
                _publish(root, tmp, final, iteration, (keep_last, retain_interval), nonce)
        except BaseException as e:  # reported by wait_for_pending_save
            _PENDING.error = e
        finally:
            _PENDING.published.set()

    future.add_done_callback(on_written)
    _PENDING.future = future
    return final


def _write_side_files(tmp: Path, mesh: ParallelMesh, tracker: RNGTracker | None, meta: dict,
                      config_json: str | None) -> None:
    """The temporary directory, this rank's RNG file, and (writer) meta.json and config.json."""
    if _is_writer():
        (tmp / RNG_DIR).mkdir(parents=True, exist_ok=False)
    _barrier()
    rng_state.save(tmp / RNG_DIR / rng_state.rng_file_name(mesh), rng_state.capture(mesh, tracker))
    if _is_writer():
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if config_json is not None:
            (tmp / CONFIG_FILE).write_text(config_json)


def _os_error(error: BaseException | None, depth: int = 0) -> OSError | None:
    """The OSError behind a failed save (DCP wraps each rank's exception)."""
    if error is None or depth > 8:
        return None
    if isinstance(error, OSError):
        return error
    if isinstance(error, CheckpointException):
        for exc, _ in error.failures.values():
            if (found := _os_error(exc, depth + 1)) is not None:
                return found
    return _os_error(error.__cause__ or error.__context__, depth + 1)


def _save_failed(error: BaseException, tmp: Path, iteration: int) -> BaseException:
    """Remove the partial save and name the path and the reason; anything but an OSError (a
    kill) is passed on as it is, its leftover removed by the next save."""
    found = _os_error(error)
    if found is None:
        return error
    if _is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
    why = os.strerror(found.errno).lower() if found.errno else str(found)
    where = found.filename or tmp
    err = CheckpointSaveError(
        f"saving the checkpoint of iteration {iteration} failed: {why} ({where}); the partial "
        f"save was removed and the previous checkpoints in {tmp.parent} are intact. Free space "
        "or give --save another directory, then resume with --load")
    err.errno = found.errno
    return err


def _publish(root: Path, tmp: Path, final: Path, iteration: int,
             keep: tuple[int | None, int | None], nonce: str) -> None:
    """Rank 0, after every rank's data and DCP's metadata are written: move the checkpoint into
    place, then point `latest` at it, then prune."""
    _fsync_dir(tmp)
    old = None
    if final.exists():  # re-saving an iteration (e.g. after resuming from an older checkpoint)
        old = final.with_name(f"{final.name}.old-{nonce}")
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(root)
    _write_text_atomic(root / LATEST_FILE, f"{iteration}\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune_checkpoints(root, keep[0], iteration, keep[1])


def prune_checkpoints(root: Path, keep_last: int | None, latest: int,
                      retain_interval: int | None = None) -> list[Path]:
    """Delete leftovers of interrupted saves, all but the newest `keep_last` checkpoints, and
    (Megatron's --save-retain-interval) those whose iteration is not a multiple of
    `retain_interval`; never the one `latest` names. Returns what was removed."""
    removed = []
    for p in root.iterdir():
        if _LEFTOVER.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if keep_last is not None:
        done = sorted((int(m.group(1)), p) for p in root.iterdir()
                      if (m := ITER_DIR.match(p.name)) and p.is_dir())
        for it, p in done[:-keep_last]:
            if it != latest:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    if retain_interval is not None:
        for p in root.iterdir():
            m = ITER_DIR.match(p.name)
            if m and p.is_dir() and int(m.group(1)) % retain_interval and int(m.group(1)) != latest:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# -- finding a checkpoint ----------------------------------------------------------------------
def _complete(path: Path) -> bool:
    return (path / DCP_METADATA).is_file() and (path / META_FILE).is_file()


def _describe(root: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} entries)" if len(names) > 20 else "")
    return f"it contains: {shown}"


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration `latest_checkpointed_iteration.txt` names, or None without the file."""
    path = Path(root) / LATEST_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise CorruptCheckpointError(
            f"{path} should hold an iteration number in ASCII digits but holds other bytes; fix "
            "it, or delete it (then the newest complete iter_* is used)") from None
    if not text.isdigit():
        raise CorruptCheckpointError(f"{path} should hold an iteration number, found {text!r}; "
                                     "fix or delete it (then the newest iter_* is used)")
    return int(text)


def resolve_checkpoint(load_dir: str | os.PathLike, iteration: int | None = None) -> Path:
    """The checkpoint directory to load: `iteration`'s, else the one `latest` names, else (no
    latest file) the newest complete iter_* directory; a checkpoint directory itself also works."""
    root = Path(load_dir)
    if not root.is_dir():
        raise CheckpointNotFoundError(f"--load {root}: no such directory")
    if iteration is None and _complete(root):
        return root
    _refuse_megatron(root)
    if iteration is None:
        iteration = latest_iteration(root)
    if iteration is None:
        done = sorted(int(m.group(1)) for p in root.iterdir()
                      if (m := ITER_DIR.match(p.name)) and _complete(p))
        if not done:
            raise CheckpointNotFoundError(
                f"no checkpoint found in {root}: there is no {LATEST_FILE} and no complete "
                f"iter_XXXXXXX directory ({_describe(root)})")
        iteration = done[-1]
        warnings.warn(f"{root} has no {LATEST_FILE}; loading the newest complete checkpoint, "
                      f"iteration {iteration}")
    path = checkpoint_dir(root, iteration)
    if not path.is_dir():
        # A re-save of this iteration was killed between moving the old copy aside and moving
        # the new one in: the old copy is complete.
        aside = [p for p in root.glob(f"{path.name}.old-*") if _complete(p)]
        if not aside:
            raise CheckpointNotFoundError(f"checkpoint {path} does not exist ({_describe(root)})")
        warnings.warn(f"{path} is missing; loading {aside[0].name}, the copy a re-save of the "
                      "same iteration had moved aside before it was interrupted")
        path = aside[0]
    missing = [n for n in (DCP_METADATA, META_FILE) if not (path / n).is_file()]
    if missing:
        raise CorruptCheckpointError(
            f"checkpoint {path} is incomplete: {', '.join(missing)} missing (a save that did "
            f"not finish?). Load an older one with its iteration, or delete it")
    return path


def _refuse_megatron(root: Path) -> None:
    """A Megatron-LM checkpoint is not a damaged megapre one: say what it is and how to convert
    it (its files differ, so the generic message would call it incomplete)."""
    from megapre.convert.mcore_files import is_megatron_dir

    if is_megatron_dir(root):
        raise CorruptCheckpointError(
            f"--load {root} is a Megatron-LM (megatron-core) checkpoint, not a megapre one; "
            f"convert it once with `megapre-convert mcore-import --load {root} --save NEW` and "
            "load NEW")


# -- reading metadata without unpickling arbitrary objects --------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's own record types, torch dtypes/sizes and paths may be named by the metadata."""

    def find_class(self, module: str, name: str):
        obj = None
        if module == "torch.distributed.checkpoint.metadata":
            obj = super().find_class(module, name)
        elif (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                                ("torch.serialization", "_get_layout"), ("torch", "Size"),
                                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                                ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}:
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return obj


class SafeFileSystemReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata load refuses anything but DCP's record types."""

    unpickler = _MetadataUnpickler  # a reader of other savers' metadata allows their records

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / DCP_METADATA
        try:
            with open(path, "rb") as f:
                metadata = self.unpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise CorruptCheckpointError(f"cannot read DCP metadata {path}: {e}") from e
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"{path} does not hold DCP metadata")
        _check_storage_paths(metadata, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_storage_paths(metadata: Metadata, path: Path) -> None:
    """Every tensor file the metadata names must be a plain relative name inside the checkpoint:
    an absolute path or '..' would make a load read any file on the machine."""
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or os.path.isabs(rel) or \
                ".." in Path(rel).parts or "\\" in rel:
            raise CorruptCheckpointError(f"{path} names the tensor file {rel!r}, which is not "
                                         "inside the checkpoint directory; refusing to load it")


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"cannot read {path / META_FILE}: {e}") from e
    if meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path / META_FILE}: format {meta.get('format')!r} is not "
                                     f"{FORMAT!r} (not a megapre checkpoint?)")
    return meta


def read_config(path: Path) -> dict | None:
    """The run's config.json saved with a checkpoint (None when it was saved without one)."""
    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{file} is not valid JSON: {e}") from e


def find_latest(load_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `load_checkpoint(load_dir, ...)` would load, or None when `load_dir` holds
    no checkpoint at all (missing or empty: start from scratch). A `latest` file that names a
    missing or partial checkpoint is an error, never a silent fresh start."""
    root = Path(load_dir)
    if not root.is_dir():
        return None
    if not _complete(root):
        _refuse_megatron(root)
    if not _complete(root) and latest_iteration(root) is None and not any(
            ITER_DIR.match(p.name) and _complete(p) for p in root.iterdir()):
        return None
    return resolve_checkpoint(root)


# -- loading -----------------------------------------------------------------------------------
def _gather_keys(here: set[str], missing: list[str], shapes: list[str]
                 ) -> tuple[set[str], list[str], list[str]]:
    """Every rank's model keys and problems (pipeline stages hold different tensors), so every
    rank takes the same decision."""
    if not _distributed():
        return here, missing, shapes
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (sorted(here), missing, shapes))
    keys = set().union(*(set(p[0]) for p in parts))
    missing = sorted({m for p in parts for m in p[1]})
    return keys, missing, sorted({s for p in parts for s in p[2]})


def _fit_report(targets: list[LoadTarget], metadata: Metadata, meta: dict,
                cfg: TransformerConfig, partial: bool = False) -> FitReport:
    saved = metadata.state_dict_metadata
    missing, shapes = [], []
    for t in targets:
        entry = saved.get(t.key)
        if entry is None:
            missing.append(t.key)
        elif not isinstance(entry, TensorStorageMetadata):
            shapes.append(f"{t.key!r} is not a tensor in the checkpoint")
        elif tuple(entry.size) != tuple(t.shape):
            shapes.append(f"{t.key!r} has shape {tuple(entry.size)} in the checkpoint but "
                          f"{tuple(t.shape)} in this model")
    here = {t.key for t in targets if t.key.startswith(MODEL_PREFIX)}
    keys, missing, shapes = _gather_keys(here, missing, shapes)
    unused = [] if partial else sorted(k for k in saved
                                       if k.startswith(MODEL_PREFIX) and k not in keys)
    return FitReport(architecture_diff(meta.get("model_config", {}), cfg), missing, shapes, unused)


def _check_fit(targets: list[LoadTarget], metadata: Metadata, path: Path, meta: dict,
               cfg: TransformerConfig, strictness: str, partial: bool = False
               ) -> list[LoadTarget]:
    """Refuse a checkpoint that does not fit (see checkpoint_fit); returns the targets to load
    (without the missing ones that `strictness` tolerates)."""
    check_strictness(strictness)
    saved = metadata.state_dict_metadata
    absent = [t.key for t in targets if t.key not in saved]
    if absent and all(k.startswith(OPTIM_PREFIX) for k in absent) and \
            not any(k.startswith(OPTIM_PREFIX) for k in saved):
        raise CheckpointMismatchError(
            f"checkpoint {path} has no optimizer state (saved without an optimizer), but this "
            "optimizer has state to restore; load the weights only (--no-load-optim, or "
            "optimizer=None)")
    report = _fit_report(targets, metadata, meta, cfg, partial)
    if report.refused(strictness):
        raise CheckpointMismatchError(mismatch_message(path, report, strictness))
    tolerated = report.tolerated(strictness)
    if tolerated and _is_writer():
        warnings.warn(f"partial load of checkpoint {path} ({STRICTNESS_FLAG} {strictness}): "
                      + "; ".join(tolerated))
    return [t for t in targets if t.key in saved]


def _extra_targets(meta: dict, metadata: Metadata) -> dict[str, torch.Tensor]:
    out = {}
    for key, entry in metadata.state_dict_metadata.items():
        if key.startswith(EXTRA_PREFIX) and isinstance(entry, TensorStorageMetadata):
            out[key] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    return out


def load_checkpoint(load_dir: str | os.PathLike, model, optimizer=None,
                    mesh: ParallelMesh | None = None, *, load_rng: bool = True,
                    iteration: int | None = None, tracker: RNGTracker | None = None,
                    seed: int | None = None, strictness: str = "raise_all",
                    select: Callable[[str], bool] | None = None, partial: bool = False
                    ) -> dict[str, Any]:
    """Load the latest (or `iteration`'s) checkpoint into `model` (and `optimizer` unless None)
    in whatever layout this job has. Collective.

    RNG states are restored when the layout is the one that saved; otherwise (or with
    load_rng=False) the streams are reseeded from seed + iteration (`seed` defaults to the saved
    config's train.seed). `strictness` (--dist-ckpt-strictness, see checkpoint_fit) decides
    whether a checkpoint of another architecture may load partly. `select` limits the load to the
    parameters whose names it accepts (the rest keep their values); `partial=True` expects the
    checkpoint to hold more than that (a pretrained model's LM head under a fine-tuning head) and
    does not report its unused tensors. Returns {"iteration",
    "consumed_samples", "extra", "config" (the saved config.json, or None), "path",
    "tokenizer" (the saving tokenizer's describe(), None for older checkpoints)}."""
    mesh = mesh or model.mesh
    models, cfg, kind = _models_and_cfg(model)
    tracker = tracker or find_tracker(model)
    path = resolve_checkpoint(load_dir, iteration)
    meta = read_meta(path)
    if meta.get("model_kind") != kind:
        raise CheckpointMismatchError(f"checkpoint {path} holds a {meta.get('model_kind')} "
                                      f"model; this run builds --model {kind}")
    _refuse_quantized_into_float(path, models)
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    keys = list(metadata.state_dict_metadata)
    model_keys = {k[len(MODEL_PREFIX):] for k in keys if k.startswith(MODEL_PREFIX)}
    saved_states = optimizer_state_names(keys, model_keys)
    if optimizer is not None and not saved_states and not any(optimizer.state.values()):
        warnings.warn(f"checkpoint {path} has no optimizer state (saved without an optimizer or "
                      "before the first step); the optimizer starts fresh")
    targets = load_targets(models, optimizer, mesh, cfg, saved_states, select)
    targets = _check_fit(targets, metadata, path, meta, cfg, strictness, partial)
    state = {t.key: t.value for t in targets}
    extra_tensors = _extra_targets(meta, metadata)
    state.update(extra_tensors)
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, no_dist=not _distributed())
    except (CheckpointException, OSError, RuntimeError, ValueError) as e:
        raise CorruptCheckpointError(f"reading the tensors of checkpoint {path} failed (a "
                                     f"damaged or partly copied directory?): {e}") from e
    with torch.no_grad():
        for t in targets:
            t.finish()

    it = int(meta["iteration"])
    config = read_config(path)
    if seed is None:
        seed = (config or {}).get("train", {}).get("seed", 1234)
    _restore_rng(path, meta, mesh, tracker, load_rng, it, seed)
    return {"iteration": it, "consumed_samples": int(meta.get("consumed_samples", 0)),
            "extra": _decode_extra(meta.get("extra", {}), extra_tensors), "config": config,
            "path": path, "tokenizer": meta.get("tokenizer")}


def _refuse_quantized_into_float(path: Path, models: list[torch.nn.Module]) -> None:
    """An int8 checkpoint (megapre.compress) loads only into a model built with its int8 layers
    (the inference programs read its config); a training run's float model cannot take it."""
    quant = (read_config(path) or {}).get("quantization")
    if quant is None or any(p.dtype == torch.int8 for m in models for p in m.parameters()):
        return
    raise CheckpointMismatchError(
        f"checkpoint {path} is int8-quantized ({quant.get('method')}, megapre.compress): it runs "
        "in megapre.generate / megapre.evaluate; train or fine-tune from the float checkpoint "
        "it was made from")


def _restore_rng(path: Path, meta: dict, mesh: ParallelMesh, tracker: RNGTracker | None,
                 load_rng: bool, iteration: int, seed: int) -> None:
    rng_file = path / RNG_DIR / rng_state.rng_file_name(mesh)
    same_layout = meta.get("layout") == _layout(mesh)
    if load_rng and same_layout and rng_file.is_file():
        rng_state.restore(rng_state.load(rng_file), mesh, tracker)
        return
    if load_rng:
        why = (f"the layout differs (saved {meta.get('layout')}, now {_layout(mesh)})"
               if not same_layout else f"{rng_file} is missing")
        if _is_writer():
            warnings.warn(f"not restoring random states from {path}: {why}; reseeding from "
                          f"seed {seed} + iteration {iteration} (dropout masks will differ from "
                          "an uninterrupted run)")
    rng_state.reseed(seed + iteration, mesh, tracker)


# -- inspection ----------------------------------------------------------------------------
def describe_checkpoint(load_dir: str | os.PathLike, iteration: int | None = None) -> dict:
    """What a checkpoint holds, without loading a tensor: iteration, layout that wrote it, model,
    tensor count and bytes, the checkpoints beside it, and `problems` (tensor files missing or
    shorter than the metadata says)."""
    path = resolve_checkpoint(load_dir, iteration)
    meta = read_meta(path)
    metadata = SafeFileSystemReader(path).read_metadata()
    tensors = {k: v for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, TensorStorageMetadata)}
    nbytes = sum(math.prod(v.size) * v.properties.dtype.itemsize for v in tensors.values())
    root = path.parent if ITER_DIR.match(path.name) else path
    from .checkpoint_verify import storage_problems

    return {"path": str(path), "iteration": meta["iteration"], "model": meta["model_kind"],
            "saved_layout": meta["layout"], "consumed_samples": meta.get("consumed_samples", 0),
            "parameters": sum(math.prod(v.size) for k, v in tensors.items()
                              if k.startswith(MODEL_PREFIX)),
            "tensors": len(tensors), "bytes": nbytes,
            "has_optimizer_state": any(not k.startswith((MODEL_PREFIX, EXTRA_PREFIX))
                                       for k in tensors),
            "checkpoints": sorted(p.name for p in root.iterdir() if ITER_DIR.match(p.name)),
            "model_config": meta["model_config"], "tokenizer": meta.get("tokenizer"),
            "problems": storage_problems(path, metadata)}


if __name__ == "__main__":  # the documented `python -m megapre.train.checkpoint DIR`
    from megapre.cli.checkpoint import main

    sys.exit(main())
