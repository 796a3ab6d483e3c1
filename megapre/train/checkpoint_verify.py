"""Is a checkpoint whole? `storage_problems` checks, without reading a tensor, that every file
DCP's metadata names exists and is long enough for the bytes it should hold (a missing or
truncated shard otherwise shows only when a resume fails, or when the only good copy has been
pruned). `read_everything` (the inspector's --verify) reads every tensor to CPU memory, checks
that floating-point values are finite and returns each file's sha256 for comparing copies."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from megapre.data.preprocess.readers import sha256_file

from .checkpoint import SafeFileSystemReader, _quiet_single_process


def _needed_sizes(metadata: Metadata) -> dict[str, int]:
    """File (relative path) -> the bytes the metadata reads from it at most."""
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    return need


def storage_problems(path: Path, metadata: Metadata) -> list[str]:
    """One line per missing or truncated tensor file."""
    problems = []
    for rel, size in sorted(_needed_sizes(metadata).items()):
        file = Path(path) / rel
        if not file.is_file():
            problems.append(f"{file} is missing (the metadata names it as holding tensors)")
        elif file.stat().st_size < size:
            problems.append(f"{file} is truncated: {file.stat().st_size} bytes, the metadata "
                            f"reads up to byte {size}")
    return problems


def read_everything(path: Path, metadata: Metadata) -> tuple[dict[str, str], list[str]]:
    """({file: sha256}, problems): every tensor read into CPU memory (the whole checkpoint at
    once), non-finite floating-point values reported by tensor name."""
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
             for k, v in metadata.state_dict_metadata.items()
             if isinstance(v, TensorStorageMetadata)}
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=True)
    except BaseException as e:  # DCP wraps read errors in CheckpointException (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return {}, [f"reading the tensors of {path} failed: {str(e).splitlines()[-1]}"]
    problems = [f"{path}: tensor {k!r} holds NaN or infinite values" for k, v in state.items()
                if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    files = {rel: sha256_file(Path(path) / rel) for rel in sorted(_needed_sizes(metadata))}
    return files, problems
