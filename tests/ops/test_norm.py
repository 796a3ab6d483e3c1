"""LayerNorm / RMSNorm (megapre.ops.layer_norm / rms_norm, modules) against the pure-torch
reference and float64 ground truth, on both CPU kernel paths (scalar and AVX2)."""
from __future__ import annotations

import pytest
import torch

import megapre.ops as ops
from megapre.ops import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Output tolerance per dtype: a few units in the last place of the stored result.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(0, 64), (1, 1), (5, 3), (7, 127), (33, 1000), (9, 4096), (3, 12288), (2, 65536),
          (2, 100000), (257, 64), (4, 8), (3, 31)]
# weight / bias presence: LayerNorm takes both; RMSNorm has no bias.
AFFINE = {"ln": [(True, True), (True, False), (False, False)], "rms": [(True, False), (False, False)]}


def _close(name, got, want, tol):
    """max |got - want| <= tol * max(1, max |want|): errors relative to the data scale."""
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype, want.shape, want.dtype)
    if want.numel() == 0:
        return
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def _inputs(kind, rows, hidden, dtype, affine, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    r = torch.randn(rows, hidden, generator=g).to(dtype) if residual else None
    w = (torch.rand(hidden, generator=g) + 0.5) if affine[0] else None
    b = torch.randn(hidden, generator=g) * 0.1 if affine[1] else None
    return x, r, w, b


def _run(fn, kind, x, r, w, b, grads):
    """Forward + backward with upstream grads `grads` = (gy, gs); returns outputs and input grads."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    x_, r_, w_, b_ = leaves
    if kind == "ln":
        out = fn.layer_norm(x_, w_, b_, 1e-5, residual=r_)
    else:
        out = fn.rms_norm(x_, w_, 1e-6, residual=r_)
    y, s = out if r is not None else (out, None)
    loss = (y.double() * grads[0].double()).sum()
    if s is not None:
        loss = loss + (s.double() * grads[1].double()).sum()
    if loss.requires_grad:
        loss.backward()
    return y.detach(), (s.detach() if s is not None else None), [
        (t.grad if t is not None and t.grad is not None else None) for t in leaves]


def _cases():
    for kind in ("ln", "rms"):
        for dtype in DTYPES:
            for rows, hidden in SHAPES:
                for affine in AFFINE[kind]:
                    for residual in (False, True):
                        if hidden > 5000 and (affine != AFFINE[kind][0] or dtype == torch.float16):
                            continue  # long rows: one affine variant, two dtypes (time budget)
                        yield kind, dtype, rows, hidden, affine, residual


@pytest.mark.parametrize("kind,dtype,rows,hidden,affine,residual", list(_cases()))
def test_matches_reference(isa, kind, dtype, rows, hidden, affine, residual):
    x, r, w, b = _inputs(kind, rows, hidden, dtype, affine, residual)
    gy = torch.randn(rows, hidden).to(dtype)
    gs = torch.randn(rows, hidden).to(dtype)
    y, s, (dx, dr, dw, db) = _run(ops, kind, x, r, w, b, (gy, gs))
    y_ref, s_ref, (dx_ref, dr_ref, dw_ref, db_ref) = _run(ref, kind, x, r, w, b, (gy, gs))
    tol = TOL[dtype]
    _close("y", y, y_ref, tol)
    if residual:
        assert torch.equal(s, s_ref), "sum output must be x + residual rounded like torch"
    if rows == 0:
        return
    _close("dx", dx, dx_ref, 3 * tol)
    if residual:
        assert torch.equal(dx, dr), "x and residual get the same gradient"
    # weight/bias grads are fp32 sums over rows: error grows like sqrt(rows)
    gtol = (1e-4 if dtype == torch.float32 else tol) * max(1.0, rows ** 0.5 / 4)
    if dw_ref is not None:
        _close("dweight", dw, dw_ref, gtol)
    if db_ref is not None:
        _close("dbias", db, db_ref, gtol)


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("residual", [False, True])
def test_fp32_grads_against_float64(isa, kind, residual):
    """The op rejects float64, so instead of gradcheck: fp32 results and grads against the
    reference evaluated in float64 (the exact math), with fp32-level tolerances."""
    x, r, w, b = _inputs(kind, 64, 300, torch.float32, AFFINE[kind][0], residual, seed=3)
    x = x * 3 + 2  # an offset mean exercises the variance computation
    gy, gs = torch.randn(64, 300), torch.randn(64, 300)
    y, s, grads = _run(ops, kind, x, r, w, b, (gy, gs))
    f64 = [t.double() if t is not None else None for t in (x, r, w, b)]
    y64, s64, grads64 = _run(ref, kind, *f64, (gy.double(), gs.double()))
    _close("y", y.double(), y64, 1e-5)
    for name, g, g64 in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads64):
        if g64 is not None:
            _close(name, g.double(), g64, 1e-4 if name in ("dweight", "dbias") else 1e-5)


def test_float64_rejected():
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        ops.layer_norm(torch.randn(4, 8, dtype=torch.float64), None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_offset_is_accurate(isa, dtype):
    """Rows with |mean| >> std: naive sum/sum-of-squares would cancel catastrophically."""
    x = (torch.randn(16, 1000) + 1000.0).to(dtype)
    w, b = torch.rand(1000) + 0.5, torch.randn(1000)
    y = ops.layer_norm(x, w, b)
    y64 = ref.layer_norm(x.double(), w.double(), b.double())
    _close("y", y.double(), y64, 4 * TOL[dtype] if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_non_contiguous_and_batched(isa, kind):
    base = torch.randn(40, 2, 96)
    x = base[:, 0, :].t().contiguous().t()  # column-major [40, 96]
    r = torch.randn(96, 40).t()
    x3 = torch.randn(3, 96, 40).transpose(1, 2)  # [3, 40, 96], last dim strided
    assert not x.is_contiguous() and not r.is_contiguous() and not x3.is_contiguous()
    w, b = torch.rand(96) + 0.5, torch.randn(96)
    fn = (lambda m, *a, **k: m.layer_norm(a[0], w, b, residual=k.get("residual"))) if kind == "ln" else \
         (lambda m, *a, **k: m.rms_norm(a[0], w, residual=k.get("residual")))
    _close("y2d", fn(ops, x), fn(ref, x), 2e-5)
    _close("y3d", fn(ops, x3), fn(ref, x3), 2e-5)
    y, s = fn(ops, x, residual=r)
    y_ref, s_ref = fn(ref, x, residual=r)
    _close("y+res", y, y_ref, 2e-5)
    assert torch.equal(s, s_ref)
    xg = x.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    gy = torch.randn(96, 40).t()  # non-contiguous upstream grad
    (fn(ops, xg) * gy).sum().backward()
    (fn(ref, xr) * gy).sum().backward()
    _close("dx", xg.grad, xr.grad, 1e-4)


def test_zero_rows(isa):
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    b = torch.zeros(16, requires_grad=True)
    y, s = ops.layer_norm(x, w, b, residual=torch.randn(0, 16))
    assert y.shape == (0, 16) and s.shape == (0, 16)
    (y.sum() + s.sum()).backward()
    assert torch.equal(w.grad, torch.zeros(16)) and torch.equal(b.grad, torch.zeros(16))
    assert x.grad.shape == (0, 16)
    assert ops.rms_norm(torch.randn(2, 0, 8), torch.ones(8)).shape == (2, 0, 8)


def test_only_sum_output_used(isa):
    """Gradient flowing only through the sum output passes straight to x and residual."""
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32, requires_grad=True)
    w = torch.rand(32, requires_grad=True)
    _, s = ops.rms_norm(x, w, residual=r)
    g = torch.randn(4, 32)
    (s * g).sum().backward()
    assert torch.equal(x.grad, g) and torch.equal(r.grad, g)
    assert torch.equal(w.grad, torch.zeros(32))


def test_only_sum_output_used_bias_without_weight(isa):
    x = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    _, s = ops.layer_norm(x, None, b, residual=torch.randn(4, 8))
    s.sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 8)) and torch.equal(b.grad, torch.zeros(8))


def test_nan_row_stays_local(isa):
    for dtype in DTYPES:
        x = torch.randn(3, 40).to(dtype)
        x[1, 7] = float("nan")
        y = ops.layer_norm(x, torch.ones(40), torch.zeros(40))
        assert torch.isnan(y[1]).all()
        _close("clean rows", y[[0, 2]], ref.layer_norm(x[[0, 2]], torch.ones(40), torch.zeros(40)), TOL[dtype])


def test_weight_grad_deterministic(isa):
    x = torch.randn(2048, 256)
    w = torch.rand(256) + 0.5
    gy = torch.randn(2048, 256)
    grads = []
    for _ in range(3):
        xw = w.clone().requires_grad_()
        (ops.layer_norm(x, xw, None) * gy).sum().backward()
        grads.append(xw.grad)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def test_weight_dtypes_follow_parameters(isa):
    """bf16 activations with bf16 parameters (a model cast with .to(bfloat16))."""
    x = torch.randn(8, 64).to(torch.bfloat16).requires_grad_()
    w = (torch.rand(64) + 0.5).to(torch.bfloat16).requires_grad_()
    b = torch.randn(64).to(torch.bfloat16).requires_grad_()
    ops.layer_norm(x, w, b).float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.bfloat16
    assert x.grad.dtype == torch.bfloat16


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm(x, torch.ones(7), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.layer_norm(x, None, torch.ones(9))
    with pytest.raises(ValueError, match="residual must match"):
        ops.layer_norm(x, None, None, residual=torch.randn(4, 8).to(torch.bfloat16))
    with pytest.raises(ValueError, match="residual must match"):
        ops.rms_norm(x, None, residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.rms_norm(torch.ones(4, 8, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="at least 1 dim"):
        ops.layer_norm(torch.tensor(1.0), None, None)
    with pytest.raises(RuntimeError, match="x must be 2-D"):  # backstop checks of the raw op
        torch.ops.megapre.norm_fwd(torch.randn(2, 3, 4), None, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.megapre.norm_fwd(x, None, torch.ones(3), None, 1e-5, False)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_module_loads_torch_state_dict(affine, bias):
    tm = torch.nn.LayerNorm(48, eps=1e-5, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            tm.weight.uniform_(0.5, 1.5)
            if bias:
                tm.bias.normal_()
    mm = ops.LayerNorm(48, eps=1e-5, elementwise_affine=affine, bias=bias)
    mm.load_state_dict(tm.state_dict())
    x = torch.randn(2, 5, 48)
    _close("module", mm(x), tm(x).detach(), 2e-5)
    y, s = mm(x, residual=torch.ones_like(x))
    _close("module+res", y, tm(x + 1).detach(), 2e-5)


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_module_loads_torch_state_dict(eps):
    tm = torch.nn.RMSNorm(48, eps=eps)
    with torch.no_grad():
        tm.weight.uniform_(0.5, 1.5)
    mm = ops.RMSNorm(48, eps=eps)
    mm.load_state_dict(tm.state_dict())
    x = torch.randn(2, 5, 48) * 1e-3  # small values make eps matter
    _close("module", mm(x), tm(x).detach(), 2e-5)
    xb = x.to(torch.bfloat16)
    mm_b, tm_b = mm.to(torch.bfloat16), tm.to(torch.bfloat16)
    _close("module bf16", mm_b(xb).float(), tm_b(xb).detach().float(), 1.6e-2)
