"""Weight initialization that does not depend on the parallel layout.

Every parameter draws from its own generator, seeded from the run seed and the parameter's
global name (layer index included). A pipeline stage that builds only layers 8-15, or a TP rank
that keeps only a slice, therefore holds exactly the values the single-process model has, which
is what lets every (TP, PP, DP) layout train the same model from step 0.
"""
from __future__ import annotations

import contextlib
import functools
import math
import zlib

import torch
from torch import nn

from megapre.parallel.layers import InitMethod


_SKIP = False


@contextlib.contextmanager
def skipped():
    """Build models without drawing their initial weights (the values are left as allocated,
    zeros in the layers' master buffers): for a caller that overwrites every weight next, e.g.
    a checkpoint conversion, where drawing a billion normals would dominate the time."""
    global _SKIP
    before, _SKIP = _SKIP, True
    try:
        yield
    finally:
        _SKIP = before


def _skip(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


_skip.skips_init = True  # layers then allocate without zero-filling (megapre.parallel.layers)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def normal(seed: int, name: str, std: float) -> InitMethod:
    """N(0, std) drawn from the generator of parameter `name`."""
    if _SKIP:
        return _skip
    return functools.partial(nn.init.normal_, mean=0.0, std=std, generator=_generator(seed, name))


def scaled_std(std: float, num_layers: int) -> float:
    """Megatron's init for the projections that write into the residual stream (attention output,
    MLP output): std / sqrt(2 * num_layers), so the residual's variance does not grow with depth."""
    return std / math.sqrt(2.0 * num_layers)


def fill_normal_(tensor: torch.Tensor, seed: int, name: str, std: float) -> torch.Tensor:
    """Initialize a replicated (unsharded) tensor in place: fp32 master draw, then cast."""
    if _SKIP:
        return tensor
    master = torch.empty(tensor.shape, dtype=torch.float32)
    normal(seed, name, std)(master)
    with torch.no_grad():
        tensor.copy_(master)
    return tensor
