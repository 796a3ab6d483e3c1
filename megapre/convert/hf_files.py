"""Reading and writing Hugging Face model directories: config.json plus safetensors weights (one
file, or shards listed in model.safetensors.index.json). Tensors are read lazily, one at a time,
so a conversion holds about one copy of the model; every tensor of the directory must be used,
or the conversion names the ones it would silently drop."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from megapre.model.config import ConfigError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers older transformers saved (GPT-2's causal masks, BERT's position ids), not weights, and
# BERT's copies of its tied word table and output bias, which transformers re-ties on load.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq",
                    "embeddings.position_ids", "cls.predictions.decoder.weight",
                    "cls.predictions.decoder.bias")


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError as e:
        raise ConfigError("converting Hugging Face weights needs the safetensors package: "
                          "pip install megapre[interop]") from e
    return safe_open


def read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ConfigError(f"--hf-dir {hf_dir}: no such directory")
    if not path.is_file():
        raise ConfigError(f"{path} is missing: --hf-dir must be a Hugging Face model directory "
                          "(config.json and model.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


class WeightReader:
    """`take(name)`: one tensor (float32, CPU) by name; `unused()` lists what was never taken.

    Each take opens its file anew: safetensors maps the whole file, and every page a read touched
    stays in the process's resident memory until the map closes, so one long-lived handle would
    end a conversion holding the source model as well as the converted one."""

    def __init__(self, hf_dir: Path, prefixes: tuple[str, ...]) -> None:
        self.dir, self.prefixes = hf_dir, prefixes
        self._open = _safetensors()
        self._where: dict[str, Path] = {}
        for file in self._files():
            try:
                with self._open(str(file), framework="pt") as handle:
                    keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ConfigError(f"{file}: not a readable safetensors file ({e}); re-download "
                                  "or re-save it") from None
            self._where.update({key: file for key in keys})
        self._taken: set[str] = set()

    def _files(self) -> list[Path]:
        index = self.dir / INDEX
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [self.dir / s for s in shards]
        else:
            files = [self.dir / WEIGHTS]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = (f" (found {', '.join(bins)}: re-save the model with safe_serialization=True)"
                    if bins else "")
            raise ConfigError(f"weights missing: {', '.join(missing)}{hint}")
        return files

    def take(self, name: str) -> torch.Tensor:
        names = [name[1:]] if name.startswith("@") else [p + name for p in self.prefixes]
        for key in names:
            if key in self._where:
                file = self._where[key]
                try:
                    with self._open(str(file), framework="pt") as handle:
                        tensor = handle.get_tensor(key)
                except Exception as e:
                    raise ConfigError(f"{file}: cannot read tensor {key} ({e}); the file is "
                                      "truncated or corrupt") from None
                self._taken.add(key)
                return tensor.float() if tensor.is_floating_point() else tensor
        raise ConfigError(f"{self.dir}: weight {names[0]} is missing (the config describes a "
                          "tensor the weight files do not hold)")

    def unused(self) -> list[str]:
        return sorted(k for k in self._where if k not in self._taken
                      and not k.endswith(IGNORED_SUFFIXES))


def write_dir(out: Path, files: dict[str, bytes], tensors: Iterable[tuple[str, torch.Tensor]],
              extra: Iterable[Path] = (), shard_bytes: int = 2**30) -> None:
    """Write a Hugging Face directory at `out` atomically: everything goes to a temporary sibling
    that is renamed into place at the end (an existing `out` is replaced only then)."""
    save_file = _save_file()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        for path in extra:
            shutil.copy2(path, tmp / path.name)
        _write_shards(tmp, tensors, save_file, shard_bytes)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_file():
    _safetensors()
    from safetensors.torch import save_file
    return save_file


def _write_shards(tmp: Path, tensors: Iterable[tuple[str, torch.Tensor]], save_file,
                  shard_bytes: int) -> None:
    """model.safetensors, or numbered shards plus the index when larger than `shard_bytes`.
    Each shard is written as soon as it is full, so the converted copies held at once are one
    shard's (the total number of shards is known only at the end: they are renamed then)."""
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        part = tmp / f"shard-{len(written):05d}.part"
        save_file(shard, str(part), metadata={"format": "pt"})
        written.append((part, list(shard)))

    for name, t in tensors:
        t = t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(tmp / WEIGHTS)
        return
    weight_map = {}
    for i, (part, names) in enumerate(written):
        file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        part.rename(tmp / file)
        weight_map.update({k: file for k in names})
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": weight_map}, indent=1))
