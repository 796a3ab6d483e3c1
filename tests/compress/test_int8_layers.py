"""The int8 tensor-parallel layers (megapre/compress/int8_layers.py): in one process they compute
the reference int8 math (megapre/ops/reference.py on the dequantized-by-definition int8 weights)
and their int8 weights are the reference per-channel quantization; at TP2 (gloo, with and without
sequence parallelism) they give the one-process outputs, including W8A8 under a row-parallel
layer, whose per-token activation scale is reduced over the full K row."""
from __future__ import annotations

import pytest
import torch

from megapre import ops
from megapre.compress.int8_layers import (Int8ColumnParallelLinear, Int8RowParallelLinear,
                                          Int8VocabHead, quantize_with_amax)
from megapre.ops import reference
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel.layers import ColumnParallelLinear, RowParallelLinear, normal_init

K, N = 48, 40


def _init(seed: int):
    return normal_init(0.5, torch.Generator().manual_seed(seed))


def _layers(mesh: ParallelMesh, mode: str, bias: bool = True, skip_bias_add: bool = False):
    col = ColumnParallelLinear(K, N, mesh, bias=bias, init_method=_init(1),
                               skip_bias_add=skip_bias_add)
    row = RowParallelLinear(N, K, mesh, bias=bias, init_method=_init(2))
    with torch.no_grad():
        for layer in (col, row):
            if layer.bias is not None:  # the same full bias for every TP size
                full = torch.linspace(-1, 1, layer.out_features)
                if getattr(layer.bias, "tensor_parallel_dim", None) == 0:
                    full = full.chunk(mesh.tp_size)[mesh.tp_rank]
                layer.bias.copy_(full)
    return (Int8ColumnParallelLinear.from_float(col, mode),
            Int8RowParallelLinear.from_float(row, mode), col, row)


def _input(seq: int = 6, batch: int = 2) -> torch.Tensor:
    x = torch.randn(seq, batch, K, generator=torch.Generator().manual_seed(5))
    x[..., 3] *= 20  # an outlier channel
    return x


def test_weights_are_the_reference_quantization():
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    q, s = reference.quantize_per_channel(w)
    assert torch.equal(quantize_with_amax(w, w.abs().amax(1)), q)
    col, row, fcol, frow = _layers(ParallelMesh.single(device="cpu"), "weight_only")
    for layer, base in ((col, fcol), (row, frow)):
        q, s = reference.quantize_per_channel(base.weight.detach())
        assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, q)
        assert torch.allclose(layer.weight_scale, s, rtol=1e-7, atol=0)
        assert not layer.weight.requires_grad and layer.bias is base.bias


@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
def test_layers_equal_reference(mode):
    col, row, *_ = _layers(ParallelMesh.single(device="cpu"), mode)
    x = _input()
    kernel = reference.int8_linear if mode == "w8a8" else reference.weight_only_int8_linear
    want_col = kernel(x, col.weight, col.weight_scale, col.bias)
    got_col = col(x)
    assert torch.allclose(got_col, want_col, rtol=1e-5, atol=1e-5)
    want_row = kernel(got_col, row.weight, row.weight_scale, row.bias)
    assert torch.allclose(row(got_col), want_row, rtol=1e-5, atol=1e-5)
    # and close to the float layers (the quantization error itself)
    dequant = col.weight.float() * col.weight_scale[:, None]
    assert torch.allclose(got_col, x @ dequant.t() + col.bias, rtol=0.05, atol=0.5)


def test_skip_bias_add_and_no_bias():
    col, *_ = _layers(ParallelMesh.single(device="cpu"), "w8a8", skip_bias_add=True)
    x = _input()
    assert torch.allclose(col(x), reference.int8_linear(x, col.weight, col.weight_scale),
                          rtol=1e-5, atol=1e-5)
    col, row, *_ = _layers(ParallelMesh.single(device="cpu"), "weight_only", bias=False)
    assert col.bias is None and row.bias is None
    assert torch.allclose(row(col(x)), reference.weight_only_int8_linear(
        col(x), row.weight, row.weight_scale), rtol=1e-5, atol=1e-5)


def test_vocab_head_pads_with_zero_logits():
    mesh = ParallelMesh.single(device="cpu")
    table = torch.randn(16, K, generator=torch.Generator().manual_seed(2))
    table[12:] = 0  # vocabulary padding rows
    head = Int8VocabHead(table, mesh)
    h = _input()
    logits = head(h)
    q, s = reference.quantize_per_channel(table)
    assert torch.allclose(logits, reference.weight_only_int8_linear(h, q, s), rtol=1e-5, atol=1e-5)
    assert torch.all(logits[..., 12:] == 0)
    assert torch.allclose(logits, h @ table.t(), rtol=0.05, atol=0.3)


def _tp_outputs(mesh: ParallelMesh, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    col, row, *_ = _layers(mesh, mode)
    x = _input(seq=8)
    if mesh.sequence_parallel:
        x = x.chunk(mesh.tp_size, 0)[mesh.tp_rank]
    with torch.no_grad():
        h = col(x)
        y = row(h)
    from megapre.parallel.comm import gather_from_sp, gather_from_tp

    h_full = gather_from_tp(h, mesh.tp_group)
    y_full = gather_from_sp(y, mesh.tp_group, 0) if mesh.sequence_parallel else y
    return h_full, y_full


def _tp_worker(rank: int, world: int, mode: str, sp: bool):
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=world, sequence_parallel=sp),
                             device="cpu")
    try:
        return _tp_outputs(mesh, mode)
    finally:
        mesh.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_equals_one_process(mode, sp):
    from megapre.parallel.testing import run_distributed

    want_h, want_y = _tp_outputs(ParallelMesh.single(device="cpu"), mode)
    for h, y in run_distributed(_tp_worker, 2, mode, sp):
        assert torch.allclose(h, want_h, rtol=1e-6, atol=1e-6)
        assert torch.allclose(y, want_y, rtol=1e-5, atol=1e-5)


def test_compiled_kernels_ran():
    assert ops.backend() != "reference"
