"""Load the compiled libraries once and say what runs.

megapre._C registers the op schemas and CPU kernels, megapre._C_cuda the CUDA kernels. When a
library is missing the ops fall back to megapre/ops/reference.py (correct, slower) with one
warning that says how to build; backend() and backend_info() report the outcome.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field

import torch

BUILD_HINT = (
    "build them with `pip install --no-build-isolation -e .` in the megapre source tree "
    "(needs g++ and ninja; the CUDA kernels also need nvcc, see README.md)"
)


@dataclass
class _State:
    cpu: bool = False
    cuda: bool = False
    errors: dict[str, str] = field(default_factory=dict)
    module: object | None = None


def _load() -> _State:
    state = _State()
    try:
        state.module = importlib.import_module("megapre._C")
        state.cpu = True
    except (ImportError, OSError) as e:  # missing .so, or built against another torch
        state.errors["megapre._C"] = f"{type(e).__name__}: {e}"
    if state.cpu and torch.version.cuda is not None:
        try:
            importlib.import_module("megapre._C_cuda")
            state.cuda = True
        except (ImportError, OSError) as e:
            state.errors["megapre._C_cuda"] = f"{type(e).__name__}: {e}"
    if not state.cpu:
        warnings.warn(
            f"megapre: compiled kernels unavailable ({state.errors['megapre._C']}); using the "
            f"pure-torch reference ops, which are slower; {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
    elif not state.cuda and torch.cuda.is_available():
        warnings.warn(
            "megapre: CUDA kernels unavailable "
            f"({state.errors.get('megapre._C_cuda', 'torch has no CUDA')}); CUDA tensors use the "
            f"reference ops; {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return state


STATE = _load()


def compiled_for(device: torch.device) -> bool:
    """True when the compiled kernels handle tensors on this device."""
    if device.type == "cpu":
        return STATE.cpu
    if device.type == "cuda":
        return STATE.cuda
    return False


def backend() -> str:
    """'compiled' when the C++ kernels are loaded (CPU, and CUDA when torch has a GPU), else
    'reference'."""
    if not STATE.cpu:
        return "reference"
    if torch.cuda.is_available() and not STATE.cuda:
        return "compiled-cpu-only"
    return "compiled"


def backend_info() -> dict:
    """What runs where: libraries loaded, the CPU ISA in use, load errors."""
    info = {
        "backend": backend(),
        "cpu": "compiled" if STATE.cpu else "reference",
        "cuda": "compiled" if STATE.cuda else ("reference" if torch.cuda.is_available() else "no GPU"),
        "cuda_library": STATE.cuda,
        "cpu_isa": STATE.module.cpu_isa() if STATE.cpu else None,
        "errors": dict(STATE.errors),
    }
    return info


def set_cpu_isa(name: str) -> None:
    """Force the CPU kernels' vector path: 'auto', 'scalar', 'avx2' or 'avx512vnni' (tests cover
    each the CPU has); naming one the CPU lacks raises ValueError."""
    if not STATE.cpu:
        raise RuntimeError(f"megapre: set_cpu_isa({name!r}) needs the compiled kernels; {BUILD_HINT}")
    try:
        STATE.module.set_cpu_isa(name)
    except ValueError as e:  # pybind maps std::invalid_argument to ValueError
        raise ValueError(str(e)) from None


def cpu_isa() -> str | None:
    return STATE.module.cpu_isa() if STATE.cpu else None
