"""megapre: Megatron-style language-model pretraining with fused CPU/CUDA kernels."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("ops", "data", "parallel", "model", "train")


def __getattr__(name: str) -> Any:
    # Submodules load on first use so `import megapre` stays cheap and never needs a compiler.
    if name in _SUBMODULES:
        return importlib.import_module(f"megapre.{name}")
    raise AttributeError(f"module 'megapre' has no attribute {name!r}")
