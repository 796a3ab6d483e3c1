"""Fused bias + GELU (megapre.ops.bias_gelu) against the pure-torch reference (torch's tanh GELU
in float32) and float64 ground truth, on every CPU kernel path the machine has."""
from __future__ import annotations

import math

import pytest
import torch

import megapre.ops as ops
from megapre.model.config import TransformerConfig
from megapre.model.transformer import MLP
from megapre.ops import reference as ref
from megapre.parallel.mesh import ParallelMesh

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerance per dtype relative to max(1, max |expected|): a few units in the last place.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# H: below one 8-wide vector, ragged tails, multiples of 8, long rows; rows: empty, one, many
SHAPES = [(0, 16), (1, 1), (3, 7), (5, 8), (4, 13), (33, 64), (7, 1000), (2, 4099), (300, 256)]


def _close(name, got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.dtype, want.dtype)
    if want.numel() == 0:
        return
    err = (got.double() - want.double()).abs().max().item()
    scale = max(1.0, want.double().abs().max().item())
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def _grads(fn, x, b, g):
    x = x.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(x, b)
    (y.double() * g.double()).sum().backward()
    return y.detach(), x.grad, (b.grad if b is not None else None)


def _gelu64(v):
    """GELU (tanh form) in float64: the ground truth."""
    return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(isa, dtype, rows, hidden, with_bias):
    gen = torch.Generator().manual_seed(rows * 131 + hidden)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    b = torch.randn(hidden, generator=gen) if with_bias else None
    g = torch.randn(rows, hidden, generator=gen).to(dtype)
    y, dx, db = _grads(ops.bias_gelu, x, b, g)
    y_ref, dx_ref, db_ref = _grads(ref.bias_gelu, x, b, g)
    tol = TOL[dtype]
    _close("y", y, y_ref, tol)
    _close("dx", dx, dx_ref, 4 * tol)
    if with_bias:
        assert db.dtype == torch.float32 and db.shape == (hidden,)
        # the kernel sums dx as stored in dtype, the reference the float32 values: allow one
        # rounding per summed row
        _close("dbias", db, db_ref, 4 * tol * max(1, rows) ** 0.5)


def test_float32_against_float64(isa):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 777, generator=gen, dtype=torch.float64) * 4
    b = torch.randn(777, generator=gen, dtype=torch.float64)
    y = ops.bias_gelu(x.float(), b.float()).double()
    want = _gelu64(x + b)
    # relative to each value where it is large, absolute near zero
    err = ((y - want).abs() / want.abs().clamp_min(1.0)).max().item()
    assert err < 1e-6, err
    xg = x.float().requires_grad_()
    ops.bias_gelu(xg, b.float()).sum().backward()
    v = (x + b).requires_grad_()
    _gelu64(v).sum().backward()
    assert (xg.grad.double() - v.grad).abs().max().item() < 2e-6


def test_extreme_and_non_finite_values(isa):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -1e4, -30.0, -9.0, -1e-30,
                      0.0, 1e-30, 9.0, 30.0, 1e4, 3e38, -3e38] + [0.5] * 2)
    y = ops.bias_gelu(x)
    want = ref.bias_gelu(x)
    same_nan = torch.isnan(y) == torch.isnan(want)
    assert same_nan.all(), (y, want)
    fin = ~torch.isnan(want)
    torch.testing.assert_close(y[fin], want[fin], atol=1e-6, rtol=1e-6)
    assert y[1] == float("inf") and y[11] == 1e4
    # a NaN in one element leaves its neighbours alone, also through backward
    xg = torch.tensor([1.0, float("nan"), -2.0] * 3, requires_grad=True)
    ops.bias_gelu(xg).sum().backward()
    assert torch.isnan(xg.grad[1::3]).all() and torch.isfinite(xg.grad[0::3]).all()
    assert torch.isfinite(xg.grad[2::3]).all()


def test_batched_non_contiguous_and_bias_dtypes(isa):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(6, 40, 24, generator=gen)
    x = base.transpose(0, 1)  # [40, 6, 24], not contiguous
    for bias in (torch.randn(24, generator=gen), torch.randn(24, generator=gen).double(),
                 torch.randn(24, generator=gen).bfloat16()):
        xg = x.detach().requires_grad_()
        bg = bias.detach().requires_grad_()
        y = ops.bias_gelu(xg, bg)
        assert y.shape == x.shape and y.dtype == x.dtype
        torch.testing.assert_close(y, ref.bias_gelu(x, bias), atol=2e-6, rtol=1e-5)
        y.sum().backward()
        assert bg.grad.dtype == bias.dtype and xg.grad.shape == x.shape
        v = (x + bias.float()).requires_grad_()
        torch.nn.functional.gelu(v, approximate="tanh").sum().backward()
        torch.testing.assert_close(bg.grad.float(), v.grad.sum((0, 1)),
                                   atol=1e-4 if bias.dtype != torch.bfloat16 else 0.5, rtol=1e-2)


def test_bias_grad_is_deterministic_and_thread_independent(isa):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4096, 96, generator=gen, requires_grad=True)
    b = torch.randn(96, generator=gen, requires_grad=True)
    g = torch.randn(4096, 96, generator=gen)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, threads):
            torch.set_num_threads(n)
            b.grad = None
            ops.bias_gelu(x, b).backward(g)
            grads.append(b.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])


def test_no_grad_for_frozen_inputs(isa):
    x = torch.randn(5, 16)
    b = torch.randn(16, requires_grad=True)
    ops.bias_gelu(x, b).sum().backward()
    assert b.grad is not None and x.grad is None
    xg = torch.randn(5, 16, requires_grad=True)
    ops.bias_gelu(xg, torch.randn(16)).sum().backward()
    assert xg.grad is not None


def test_bad_inputs():
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.bias_gelu(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"bias must have shape \[4\]"):
        ops.bias_gelu(torch.ones(3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="at least 1 dim"):
        ops.bias_gelu(torch.tensor(1.0))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        ops.bias_gelu(torch.ones(3, 4), [1.0, 2.0, 3.0, 4.0])


def test_gelu_mlp_fused_equals_unfused():
    """The model's GELU MLP gives the same outputs and grads with and without the fusion."""
    mesh = ParallelMesh.single(device="cpu")
    outs = []
    for fused in (True, False):
        cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                                vocab_size=64, seq_length=8, bias_activation_fusion=fused)
        mlp = MLP(cfg, mesh, "decoder.layers.0.mlp", seed=3)
        with torch.no_grad():
            for p in mlp.parameters():  # non-zero biases so the fusion matters
                p.add_(0.01 * torch.arange(p.numel()).reshape(p.shape).sin())
        x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = mlp(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, {n: p.grad for n, p in mlp.named_parameters()}))
    (y1, gx1, gp1), (y2, gx2, gp2) = outs
    assert outs and MLP(TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                                          vocab_size=64, seq_length=8), mesh, "m", 0).fused_gelu
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-5)
    for n in gp1:
        torch.testing.assert_close(gp1[n], gp2[n], atol=1e-5, rtol=1e-5, msg=n)
