"""Shared pytest set-up: the `cuda` marker skips without a GPU; `isa` runs a test once per CPU
kernel path (portable scalar and AVX2) so both are covered on an AVX2 machine."""
from __future__ import annotations

import pytest
import torch

import megapre.ops as ops


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _isas() -> list[str]:
    info = ops.backend_info()
    if info["cpu"] != "compiled":
        return ["reference"]
    import megapre._C as C

    isas = ["scalar"]
    if C.cpu_has_avx2():
        isas.append("avx2")
    if getattr(C, "cpu_has_avx512vnni", lambda: False)():
        isas.append("avx512vnni")
    return isas


@pytest.fixture(params=_isas())
def isa(request):
    """Run the test with the CPU kernels forced onto one ISA, restoring 'auto' after."""
    if request.param != "reference":
        ops.set_cpu_isa(request.param)
    yield request.param
    if request.param != "reference":
        ops.set_cpu_isa("auto")
