"""On-disk cache of dataset indices, keyed by a sha256 of everything that defines them.

Layout: `<cache_dir>/<key>-<kind>-<name>.npy` for each array plus `<key>-<kind>-description.json`
(what went into the key, human readable). Arrays are written to temporary names and renamed; the
description is renamed into place last and marks the entry complete, so a killed build never
leaves a half entry that looks valid.

Who builds (build_or_load):
- torch.distributed initialized: global rank 0 builds (or local rank 0 of every node with
  `node_local=True`, for a cache directory that is not shared between nodes); everyone then meets
  in one all_gather_object that carries the builders' errors, so a failed build raises on every
  rank instead of leaving the others in a barrier forever.
- otherwise (independent processes, tools/build_index.py, tests): an exclusive file lock beside
  the entry; the first process builds, the others wait (up to `wait_timeout_s`) and then load.
  flock locks die with their process, so a crashed builder never leaves a stale lock behind.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from megapre.data.build_progress import BuildProgress

FORMAT_VERSION = 1
FINGERPRINT_FULL_LIMIT = 256 << 20  # hash whole .idx files up to this size, else head + tail
FINGERPRINT_CHUNK = 64 << 20


@dataclass
class CacheConfig:
    """Where and how indices are cached.

    cache_dir: `--data-cache-path`; None puts the cache in `<data dir>/index-cache` beside the data.
    enabled: False builds in memory on every rank and writes nothing.
    node_local: the cache dir is per node (e.g. local SSD): local rank 0 of each node builds.
    wait_timeout_s: how long a process waits for another one's build (file-lock mode).
    """

    cache_dir: str | None = None
    enabled: bool = True
    node_local: bool = False
    wait_timeout_s: float = 3600.0
    progress_interval: float = 2.0   # seconds between progress lines of a long build (0: none)

    def directory_for(self, path_prefix: str | os.PathLike) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser().resolve()
        return Path(path_prefix).expanduser().resolve().parent / "index-cache"


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size + sha256 of a file's content (whole file up to 256 MiB, else size + first and last
    64 MiB). Content-based rather than mtime-based, so copies of a dataset on several nodes share
    one key."""
    p = Path(path)
    try:
        size = p.stat().st_size
        h = hashlib.sha256()
        with open(p, "rb") as f:
            if size <= FINGERPRINT_FULL_LIMIT:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                how = "full"
            else:
                h.update(f.read(FINGERPRINT_CHUNK))
                f.seek(size - FINGERPRINT_CHUNK)
                h.update(f.read(FINGERPRINT_CHUNK))
                how = "head+tail"
    except OSError as e:
        raise FileNotFoundError(f"cannot fingerprint {p} for the index cache: {e.strerror or e}") from e
    return {"size": size, "sha256": h.hexdigest(), "hashed": how}


def indexed_fingerprint(path_prefix: str | os.PathLike) -> dict[str, Any]:
    """Identity of an indexed dataset P.bin/P.idx for cache keys: the prefix, the .idx content
    hash and the .bin size (memoized per file version: splits of one dataset hash it once)."""
    prefix = str(Path(path_prefix).expanduser().resolve())
    try:
        idx_stat, bin_stat = os.stat(prefix + ".idx"), os.stat(prefix + ".bin")
    except OSError as e:
        raise FileNotFoundError(f"cannot stat {e.filename} for the index cache: {e.strerror or e}") from e
    version = (idx_stat.st_size, idx_stat.st_mtime_ns, idx_stat.st_ino, bin_stat.st_size)
    return dict(_fingerprint(prefix, version))


@functools.lru_cache(maxsize=256)
def _fingerprint(prefix: str, version: tuple[int, ...]) -> tuple[tuple[str, Any], ...]:
    fp = {"path_prefix": prefix, "idx": file_fingerprint(prefix + ".idx"), "bin_size": version[-1]}
    return tuple(fp.items())


def cache_key(kind: str, description: Mapping[str, Any]) -> str:
    blob = json.dumps({"format_version": FORMAT_VERSION, "kind": kind, **description}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class IndexCache:
    """One cache entry: a set of named numpy arrays under a key derived from `description`."""

    def __init__(self, directory: str | os.PathLike, kind: str, description: Mapping[str, Any],
                 names: Sequence[str]) -> None:
        self.directory = Path(directory)
        self.kind = kind
        self.description = {"format_version": FORMAT_VERSION, "kind": kind, **description}
        self.key = cache_key(kind, description)
        self.names = tuple(names)

    def path(self, name: str) -> Path:
        return self.directory / f"{self.key}-{self.kind}-{name}.npy"

    @property
    def description_path(self) -> Path:
        return self.directory / f"{self.key}-{self.kind}-description.json"

    @property
    def lock_path(self) -> Path:
        return self.directory / f"{self.key}-{self.kind}.lock"

    def is_complete(self) -> bool:
        return self.description_path.is_file() and all(self.path(n).is_file() for n in self.names)

    def load(self) -> dict[str, np.ndarray]:
        """Memory-map every array (read-only; pages are shared by all processes on a node)."""
        out = {}
        for n in self.names:
            try:
                out[n] = np.load(self.path(n), mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise RuntimeError(
                    f"index cache entry {self.path(n)} is unreadable ({e}); delete the files "
                    f"{self.directory}/{self.key}-* and rerun to rebuild them"
                ) from e
        return out

    def save(self, arrays: Mapping[str, np.ndarray]) -> None:
        missing = set(self.names) - set(arrays)
        if missing:
            raise ValueError(f"IndexCache.save: arrays missing: {sorted(missing)}")
        self.ensure_directory()
        for n in self.names:
            _atomic_write(self.path(n), lambda f, a=arrays[n]: np.save(f, np.ascontiguousarray(a),
                                                                        allow_pickle=False))
        text = json.dumps(self.description, indent=2, sort_keys=True) + "\n"
        _atomic_write(self.description_path, lambda f: f.write(text.encode("utf-8")))

    def ensure_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermissionError(
                f"cannot create the index cache directory {self.directory} ({e.strerror or e}); "
                "pass a writable --data-cache-path"
            ) from e
        if not os.access(self.directory, os.W_OK):
            raise PermissionError(
                f"index cache directory {self.directory} is not writable; pass a writable --data-cache-path"
            )


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class FileLock:
    """Exclusive flock on a file, acquired with a timeout (polling, so it can give up cleanly)."""

    def __init__(self, path: Path, timeout_s: float, what: str) -> None:
        self.path, self.timeout_s, self.what = path, timeout_s, what
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                holder = _read_holder(self.path)
                os.close(fd)
                raise TimeoutError(
                    f"waited {self.timeout_s:.0f} s for {self.path} while another process ({holder}) "
                    f"builds {self.what}; it is still running. Wait for it, raise the timeout "
                    "(CacheConfig.wait_timeout_s / --data-cache-wait), or build the indices "
                    "beforehand with tools/build_index.py"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown process"
    except OSError:
        return "unknown process"


def _dist_info(group: Any) -> tuple[bool, int, int]:
    """(initialized, rank, local rank) from torch.distributed and torchrun's LOCAL_RANK."""
    dist = sys.modules.get("torch.distributed")  # never imported -> never initialized (skip torch's import)
    if dist is None:
        return False, 0, 0
    if not (dist.is_available() and dist.is_initialized()):
        return False, 0, 0
    rank = dist.get_rank(group)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return True, rank, local_rank


def _build_locked(cache: IndexCache, build: Callable[[], Mapping[str, np.ndarray]],
                  config: CacheConfig) -> bool:
    """Build and save under the entry's file lock unless someone else completed it first.
    Returns True when this process built it."""
    if cache.is_complete():
        return False
    cache.ensure_directory()
    with FileLock(cache.lock_path, config.wait_timeout_s, f"{cache.kind} indices {cache.key[:12]}"):
        if cache.is_complete():
            return False
        cache.save(build())
        return True


def build_or_load(cache: IndexCache | None, build: Callable[[], Mapping[str, np.ndarray]],
                  config: CacheConfig, group: Any = None) -> tuple[dict[str, np.ndarray], str]:
    """Return the entry's arrays and how they were obtained: 'built', 'loaded' or 'memory'
    (cache disabled). See the module docstring for who builds."""
    if cache is None or not config.enabled:
        return dict(build()), "memory"
    distributed, rank, local_rank = _dist_info(group)
    if not distributed:
        built = _build_locked(cache, build, config)
        return cache.load(), "built" if built else "loaded"

    import torch.distributed as dist

    builder = local_rank == 0 if config.node_local else rank == 0
    status: str | None = None
    built = False
    if builder:
        try:
            built = _build_locked(cache, build, config)
        except Exception as e:  # reported to every rank below, then re-raised here
            status = f"{type(e).__name__}: {e}"
            error = e
    statuses: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(statuses, (rank, status), group=group)
    failures = [(r, s) for r, s in statuses if s is not None]
    if status is not None:
        raise error
    if failures:
        r, s = failures[0]
        raise RuntimeError(f"rank {r} failed to build the {cache.kind} indices: {s}")
    if not cache.is_complete():
        raise FileNotFoundError(
            f"rank {rank}: {cache.description_path} is missing after the building rank finished. "
            f"Is the cache directory {cache.directory} shared by all nodes? If it is node-local, "
            "use --data-cache-node-local (CacheConfig.node_local=True) so each node builds its own"
        )
    return cache.load(), "built" if built else "loaded"


@dataclass
class CachedIndices:
    """What a dataset keeps of its cached index arrays: the arrays and where they came from."""

    arrays: dict[str, np.ndarray]
    status: str  # 'built', 'loaded' or 'memory'
    seconds: float
    paths: dict[str, str] | None
    key: str | None


def cached_indices(kind: str, path_prefix: str | None, description: dict[str, Any], names: Sequence[str],
                   build: Callable[[], Mapping[str, np.ndarray]], config: CacheConfig,
                   group: Any = None) -> CachedIndices:
    """The index arrays of one dataset (GPT samples, BERT pairs, a blend): from the cache under
    the hash of `description`, or built (by the rank that builds, see build_or_load) and cached in
    the directory `config` gives for `path_prefix`. path_prefix None: not cacheable, built in memory."""
    cache = (IndexCache(config.directory_for(path_prefix), kind, description, names)
             if config.enabled and path_prefix is not None else None)
    t0 = time.perf_counter()
    arrays, status = build_or_load(cache, build, config, group)
    return CachedIndices(arrays, status, time.perf_counter() - t0,
                         {n: str(cache.path(n)) for n in names} if cache else None,
                         cache.key if cache else None)


class CachedDataset:
    """Base of the datasets whose index arrays live in the cache (GPT, BERT, blended).

    A subclass names its entry kind and arrays (`cache_kind`, `index_names`), implements `_build`,
    and calls `_cache_indices` (or `_cache_split_indices`) in __init__; that sets `description`,
    `cache_status` ('built', 'loaded' or 'memory'), `build_seconds`, `cache_paths` and `cache_key`,
    and hands the arrays to `_set_indices` (default: one attribute per name). Pickling drops the
    memory-mapped arrays of a cached entry and re-maps them from `cache_paths`, so DataLoader
    workers share the pages instead of receiving copies.
    """

    cache_kind: str
    index_names: tuple[str, ...]

    def _build(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _advance(self, done: int, total: int, what: str = "") -> None:
        """How far `_build` got (any unit), for the progress line's ETA."""
        progress = getattr(self, "_progress", None)
        if progress is not None:
            progress.advance(done, total, what)

    def _build_with_progress(self, label: str, interval: float) -> dict[str, np.ndarray]:
        with BuildProgress(label, interval) as self._progress:
            try:
                return self._build()
            finally:
                self._progress = None

    def _progress_label(self, path_prefix: str | None, description: dict[str, Any]) -> str:
        where = f"{description['split']} split of " if description.get("split") else ""
        n = description.get("num_samples") or description.get("size")
        return (f"{self.cache_kind} indices for {where}{path_prefix or 'memory'}"
                + (f" ({n:,} samples)" if isinstance(n, int) else ""))

    def _set_indices(self, arrays: Mapping[str, np.ndarray]) -> None:
        for n in self.index_names:
            setattr(self, n, arrays[n])

    def _cache_indices(self, path_prefix: str | None, description: dict[str, Any], config: CacheConfig,
                       group: Any = None) -> None:
        self.description = description
        label = self._progress_label(path_prefix, description)
        build = functools.partial(self._build_with_progress, label, config.progress_interval)
        got = cached_indices(self.cache_kind, path_prefix, description, self.index_names, build,
                             config, group)
        self.cache_status, self.build_seconds = got.status, got.seconds
        self.cache_paths, self.cache_key = got.paths, got.key
        self._set_indices(got.arrays)

    def _cache_split_indices(self, path_prefix: str, split: str, document_range: tuple[int, int],
                             num_samples: int | None, options: Mapping[str, Any], config: CacheConfig,
                             group: Any = None) -> None:
        """The indices of documents `document_range` of one indexed dataset (`split` in messages),
        keyed by the dataset's content, the range, the sample count and the index `options`."""
        description = {
            "class": self.cache_kind, "dataset": indexed_fingerprint(path_prefix), "split": split,
            "document_range": list(document_range), "num_samples": num_samples, **options,
        }
        self._cache_indices(path_prefix, description, config, group)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.cache_paths is not None:
            for n in self.index_names:
                state.pop(n, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.cache_paths is not None:
            self._set_indices({n: np.load(p, mmap_mode="r") for n, p in self.cache_paths.items()})
