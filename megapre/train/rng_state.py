"""Every random stream a training process draws from, as a flat dict of tensors.

A resumed run continues bit-for-bit only if dropout masks (default generators and the model
parallel tracker's streams) and any host-side randomness (numpy, `random`) pick up where they
stopped. The states are tensors only, so the file is written with torch.save and read back with
`torch.load(weights_only=True)`: nothing in it can run code when loaded.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.random import (MODEL_PARALLEL_RNG, RNGTracker, stage_seed,
                                     tensor_parallel_seed)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors (refused, never unpickled)."""


def rng_file_name(mesh: ParallelMesh) -> str:
    """One file per rank; the CP coordinate is named only under context parallelism, so
    checkpoints of CP-free runs keep their names."""
    cp = f"{mesh.cp_rank}_" if mesh.cp_size > 1 else ""
    return f"rank_{mesh.pp_rank}_{mesh.dp_rank}_{cp}{mesh.tp_rank}.pt"


def capture(mesh: ParallelMesh, tracker: RNGTracker | None) -> dict[str, torch.Tensor]:
    states = {"torch.cpu": torch.get_rng_state()}
    if mesh.device.type == "cuda":
        states["torch.cuda"] = torch.cuda.get_rng_state(mesh.device)
    if tracker is not None:
        for name, (cpu, dev) in tracker.get_states().items():
            states[f"tracker.{name}.cpu"] = cpu
            if dev is not None:
                states[f"tracker.{name}.cuda"] = dev
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    if kind != "MT19937":
        raise ValueError(f"numpy's global generator is {kind}, expected MT19937")
    states["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    states["numpy.pos_has_gauss"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    states["numpy.gauss"] = torch.tensor(gauss, dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    states["python.state"] = torch.tensor((version, *internal), dtype=torch.int64)
    states["python.gauss_next"] = torch.tensor(
        [0.0 if gauss_next is None else gauss_next, float(gauss_next is not None)],
        dtype=torch.float64)
    return states


def restore(states: dict[str, torch.Tensor], mesh: ParallelMesh,
            tracker: RNGTracker | None) -> None:
    torch.set_rng_state(states["torch.cpu"])
    if mesh.device.type == "cuda" and "torch.cuda" in states:
        torch.cuda.set_rng_state(states["torch.cuda"], mesh.device)
    if tracker is not None:
        names = {k[len("tracker."):].rsplit(".", 1)[0] for k in states
                 if k.startswith("tracker.")}
        tracker.set_states({n: (states[f"tracker.{n}.cpu"], states.get(f"tracker.{n}.cuda"))
                            for n in names})
    pos, has_gauss = (int(v) for v in states["numpy.pos_has_gauss"])
    np.random.set_state(("MT19937", states["numpy.keys"].numpy().astype(np.uint32), pos,
                         has_gauss, float(states["numpy.gauss"])))
    version, *internal = (int(v) for v in states["python.state"])
    gauss, has_next = (float(v) for v in states["python.gauss_next"])
    random.setstate((version, tuple(internal), gauss if has_next else None))


def reseed(seed: int, mesh: ParallelMesh, tracker: RNGTracker | None) -> None:
    """Deterministic fresh streams for a run resumed in another layout (the saved per-rank
    streams have no meaning there): the same rule as at start-up, from `seed`."""
    torch.manual_seed(stage_seed(seed, mesh))
    if tracker is not None:
        tracker.reset()
        tracker.add(MODEL_PARALLEL_RNG, tensor_parallel_seed(seed, mesh))
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save(path: Path, states: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(states, tmp)
    tmp.replace(path)


def load(path: Path) -> dict[str, torch.Tensor]:
    """Read an RNG file with weights_only semantics; anything but str -> tensor is refused."""
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a forbidden global, or a damaged file
        raise UnsafeCheckpointError(
            f"refusing to load RNG state file {path}: it is not a plain dict of tensors that "
            f"torch.load(weights_only=True) accepts ({type(e).__name__}: {str(e)[:300]}); "
            "the file is damaged or was not written by megapre. Resume without it with "
            "--no-load-rng") from e
    if not isinstance(states, dict) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in states.items()):
        raise UnsafeCheckpointError(f"RNG state file {path} does not hold a dict of tensors; "
                                    "resume with --no-load-rng")
    missing = {"torch.cpu", "numpy.keys", "numpy.pos_has_gauss", "numpy.gauss", "python.state",
               "python.gauss_next"} - set(states)
    if missing:
        raise UnsafeCheckpointError(f"RNG state file {path} lacks {sorted(missing)}; resume "
                                    "with --no-load-rng")
    return states
