"""CUDA kernels (megapre._C_cuda) against megapre.ops.reference, forward and backward, over
shapes that reach every launch mode of the kernels: warp-per-row, block-per-row with the row in
registers, and the long-row loop kernels; 16-byte vector paths and the scalar fallback (odd
sizes, misaligned pointers); the tensor-core and CUDA-core int8 GEMMs and the small-M paths.
Every test needs a GPU (module-wide `cuda` marker; conftest skips them without one)."""
from __future__ import annotations

import pytest
import torch

import megapre.ops as ops
from megapre.ops import reference as ref

pytestmark = pytest.mark.cuda

DEV = "cuda"
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) for outputs of size ~1 rounded to each dtype; kernels and reference both compute
# in float32 but add in different orders.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def gen(*shape, dtype=torch.float32, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).to(DEV)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """Same values, data pointer offset by one element (not 16-byte aligned): the scalar path."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def close(got, exp, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), exp.float(), atol=atol * scale, rtol=rtol * scale)


def test_cuda_backend_is_compiled():
    """The ops below must run the CUDA kernels, not silently fall back to the reference."""
    info = ops.backend_info()
    assert info["cuda"] == "compiled", info
    for name in ["norm_fwd", "norm_bwd", "scale_mask_softmax_fwd", "scale_mask_softmax_bwd",
                 "bias_gelu_fwd", "bias_gelu_bwd", "quantize_rowwise", "int8_gemm",
                 "weight_only_int8_gemm"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"megapre::{name}", "CUDA"), name


# ---- LayerNorm / RMSNorm -----------------------------------------------------------------------
# H: warp mode (<= 1024 elements), block mode in registers (<= 16384 forward, <= 8192 backward
# with 16-byte vectors), loop mode beyond; odd H takes the scalar path with smaller limits.
NORM_H = [1, 7, 64, 100, 768, 1024, 1000, 2048, 4097, 5120, 8192, 12288, 16384, 16392, 65536]


def _norm(x, w, b, rms, residual, eps):
    if rms:
        return ops.rms_norm(x, w, eps, residual=residual), ref.rms_norm
    return ops.layer_norm(x, w, b, eps, residual=residual), ref.layer_norm


def _ref_norm(fn, x, w, b, rms, residual, eps):
    return fn(x, w, eps, residual) if rms else fn(x, w, b, eps, residual)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("H", NORM_H)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_forward_backward(dtype, H, rms, residual):
    R = 3 if H >= 16384 else 37
    eps = 1e-5
    x = gen(R, H, dtype=dtype, shift=0.5).requires_grad_(True)
    r = gen(R, H, dtype=dtype, seed=1).requires_grad_(True) if residual else None
    w = gen(H, seed=2, scale=0.5, shift=1.0).requires_grad_(True)
    b = None if rms else gen(H, seed=3).requires_grad_(True)
    out, fn = _norm(x, w, b, rms, r, eps)
    leaves = [t for t in (x, r, w, b) if t is not None]
    rleaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    rx, rr = rleaves[0], (rleaves[1] if residual else None)
    rw = rleaves[2 if residual else 1]
    rb = None if rms else rleaves[-1]
    rout = _ref_norm(fn, rx, rw, rb, rms, rr, eps)
    y, s = out if residual else (out, None)
    ry, rs = rout if residual else (rout, None)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, ry, dtype, scale=4)
    if residual:
        assert torch.equal(s, rs)  # x + residual rounded to dtype, bit for bit

    dy = gen(R, H, dtype=dtype, seed=4)
    ds = gen(R, H, dtype=dtype, seed=5) if residual else None
    grads_out = [dy] + ([ds] if residual else [])
    outs = [y] + ([s] if residual else [])
    routs = [ry] + ([rs] if residual else [])
    got = torch.autograd.grad(outs, leaves, grads_out)
    exp = torch.autograd.grad(routs, rleaves, grads_out)
    close(got[0], exp[0], dtype, scale=8)                         # dx
    if residual:
        torch.testing.assert_close(got[1], got[0], atol=0, rtol=0)  # dresidual == dx
    # dweight / dbias: float32 sums over R rows
    for g, e in zip(got[1 + residual:], exp[1 + residual:]):
        torch.testing.assert_close(g, e, atol=2e-3 * R ** 0.5 * (1 if dtype == torch.float32 else 4),
                                   rtol=2e-3)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("R,H", [(4096, 64), (2048, 1024), (1000, 4096), (300, 12288)])
def test_norm_many_rows_deterministic(dtype, R, H):
    """Many rows per worker (partial dweight/dbias sums) and a bitwise-repeatable backward."""
    x = gen(R, H, dtype=dtype).requires_grad_(True)
    w = gen(H, seed=1).requires_grad_(True)
    b = gen(H, seed=2).requires_grad_(True)
    dy = gen(R, H, dtype=dtype, seed=3)
    y = ops.layer_norm(x, w, b)
    g1 = torch.autograd.grad(y, (x, w, b), dy)
    g2 = torch.autograd.grad(ops.layer_norm(x, w, b), (x, w, b), dy)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)
    rx, rw, rb = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    ry = ref.layer_norm(rx, rw, rb)
    close(y, ry, dtype, scale=4)
    e = torch.autograd.grad(ry, (rx, rw, rb), dy)
    close(g1[0], e[0], dtype, scale=8)
    for a, c in zip(g1[1:], e[1:]):
        torch.testing.assert_close(a, c, atol=2e-3 * R ** 0.5, rtol=2e-3)


@pytest.mark.parametrize("dtype", FLOATS)
def test_norm_misaligned_noncontiguous_and_3d(dtype):
    H = 640
    x = misaligned(gen(9, H, dtype=dtype))
    r = misaligned(gen(9, H, dtype=dtype, seed=1))
    w = misaligned(gen(H, seed=2))
    y, s = ops.layer_norm(x, w, None, residual=r)
    ry, rs = ref.layer_norm(x, w, None, residual=r)
    close(y, ry, dtype, scale=4)
    assert torch.equal(s, rs)
    xt = gen(H, 12, dtype=dtype).t()  # non-contiguous
    close(ops.rms_norm(xt, None), ref.rms_norm(xt, None), dtype, scale=4)
    x3 = gen(2, 5, H, dtype=dtype)
    close(ops.rms_norm(x3, w.to(dtype)), ref.rms_norm(x3, w.to(dtype)), dtype, scale=4)


def test_norm_raw_op_outputs():
    x = gen(5, 96)
    y, s, mean, rstd = torch.ops.megapre.norm_fwd(x, None, None, None, 1e-5, False)
    assert s.numel() == 0 and mean.shape == (5,) and rstd.shape == (5,)
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(-1, unbiased=False) + 1e-5))
    _, _, mean, rstd = torch.ops.megapre.norm_fwd(x, None, None, None, 1e-6, True)
    assert mean.numel() == 0
    torch.testing.assert_close(rstd, torch.rsqrt(x.square().mean(-1) + 1e-6))
    dx, dw, db = torch.ops.megapre.norm_bwd(x, None, x, None, mean, rstd, True, False, False)
    assert dx.shape == x.shape and dw.numel() == 0 and db.numel() == 0


def test_norm_zero_rows():
    x = torch.empty(0, 64, device=DEV, requires_grad=True)
    w = torch.ones(64, device=DEV, requires_grad=True)
    b = torch.zeros(64, device=DEV, requires_grad=True)
    y = ops.layer_norm(x, w, b)
    assert y.shape == (0, 64)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b), allow_unused=True)
    assert gw is None or torch.count_nonzero(gw) == 0
    _, dw, db = torch.ops.megapre.norm_bwd(x.detach(), None, x.detach(), w, torch.empty(0, device=DEV),
                                           torch.empty(0, device=DEV), False, True, True)
    assert torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0 and dw.shape == (64,)


# ---- bias + GELU -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 7), (64, 1024), (5, 4099), (2048, 512)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(dtype, rows, hidden, with_bias):
    x = gen(rows, hidden, dtype=dtype, scale=3.0, seed=1)
    b = gen(hidden, seed=2) if with_bias else None
    g = gen(rows, hidden, dtype=dtype, seed=3)
    xg = x.detach().requires_grad_()
    bg = b.detach().requires_grad_() if b is not None else None
    y = ops.bias_gelu(xg, bg)
    y.backward(g)
    xr = x.detach().float().requires_grad_()
    br = b.detach().requires_grad_() if b is not None else None
    yr = ref.bias_gelu(xr, br)
    yr.backward(g.float())
    assert y.dtype == dtype and y.shape == x.shape
    close(y, yr, dtype, scale=4)
    close(xg.grad, xr.grad, dtype, scale=8)
    if with_bias:
        close(bg.grad, br.grad, dtype, scale=8 * max(1, rows) ** 0.5)
    nan = ops.bias_gelu(torch.tensor([float("nan"), float("inf"), 1.0], device=DEV))
    assert torch.isnan(nan[0]) and nan[1] == float("inf") and torch.isfinite(nan[2])


# ---- scale + mask + softmax --------------------------------------------------------------------
# sk: warp mode (<= 1024 with vectors), block mode, loop mode (> 16384 fwd / 8192 bwd with
# vectors, > 4096 scalar); odd sk -> scalar path.
SK = [1, 7, 32, 100, 128, 1000, 1024, 2048, 4097, 8192, 16392]


def _softmax_check(scores, mask, scale, causal, dtype):
    s = scores.detach().requires_grad_(True)  # same storage: keeps a misaligned pointer
    p = ops.scale_mask_softmax(s, mask, scale, causal)
    rs = scores.detach().float().requires_grad_(True)
    rp = ref.scale_mask_softmax(rs, mask, scale, causal)
    assert p.dtype == dtype and p.shape == scores.shape
    assert not torch.isnan(p).any()
    close(p, rp, dtype)
    hidden = torch.zeros(scores.shape, dtype=torch.bool, device=DEV)
    if mask is not None:
        hidden |= mask
    if causal:
        hidden |= ref.causal_mask(scores.shape[-2], scores.shape[-1], DEV)
    assert torch.count_nonzero(p[hidden]) == 0  # exactly zero where masked
    g = gen(*scores.shape, dtype=dtype, seed=9)
    (ds,) = torch.autograd.grad(p, s, g)
    # against the backward formula on the kernel's own probs (tight) and reference autograd
    pf = p.float()
    exp = scale * pf * (g.float() - (g.float() * pf).sum(-1, keepdim=True))
    close(ds, exp, dtype, scale=4)
    (rds,) = torch.autograd.grad(rp, rs, g.float())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(ds.float(), rds, atol=atol * 20 + (0 if dtype == torch.float32 else 1e-2),
                               rtol=rtol * 20)
    assert torch.count_nonzero(ds[hidden]) == 0


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sk", SK)
@pytest.mark.parametrize("causal", [False, True])
def test_softmax(dtype, sk, causal):
    sq = min(sk, 9) if sk > 1024 else min(sk, 33)
    b, h = (1, 2) if sk > 1024 else (2, 3)
    scores = gen(b, h, sq, sk, dtype=dtype, scale=3.0)
    _softmax_check(scores, None, 0.125, causal, dtype)
    mask = torch.rand(b, 1, sq, sk, device=DEV) < 0.3
    _softmax_check(scores, mask, 1.0, causal, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sq,sk", [(5, 12), (12, 5), (1, 300), (300, 1), (64, 64)])
def test_softmax_causal_alignment_and_broadcast_masks(dtype, sq, sk):
    scores = gen(2, 2, sq, sk, dtype=dtype, scale=2.0)
    _softmax_check(scores, None, 0.5, True, dtype)                       # bottom-right aligned
    for shape in [(1, 1, 1, sk), (2, 1, sq, sk), (1, 2, sq, 1), (2, 2, sq, sk)]:
        mask = torch.rand(*shape, device=DEV) < 0.4
        _softmax_check(scores, mask, 0.5, True, dtype)
        _softmax_check(scores, mask, 0.5, False, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sk", [16, 33, 2048, 20000])
def test_softmax_fully_masked_rows_are_zero(dtype, sk):
    scores = gen(1, 2, 4, sk, dtype=dtype)
    mask = torch.zeros(1, 2, 4, sk, dtype=torch.bool, device=DEV)
    mask[:, :, 1] = True
    mask[:, 1] = True
    _softmax_check(scores, mask, 1.0, False, dtype)
    p = ops.scale_mask_softmax(scores, mask)
    assert torch.count_nonzero(p[:, :, 1]) == 0 and torch.count_nonzero(p[:, 1]) == 0
    # sq > sk causal: the first sq - sk query rows see no key
    s2 = gen(1, 1, sk + 3, sk, dtype=dtype) if sk < 2048 else gen(1, 1, 4, 2, dtype=dtype)
    _softmax_check(s2, None, 1.0, True, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_misaligned_and_noncontiguous(dtype):
    scores = misaligned(gen(2, 2, 5, 64, dtype=dtype))
    mask = (torch.rand(2, 1, 64, 5, device=DEV) < 0.3).transpose(-1, -2)  # strided mask
    _softmax_check(scores, mask, 0.3, True, dtype)
    st = gen(2, 2, 64, 5, dtype=dtype).transpose(-1, -2)
    _softmax_check(st, None, 1.0, False, dtype)


def test_softmax_neg_inf_scores_match_reference():
    scores = gen(1, 1, 3, 40)
    scores[0, 0, 0] = float("-inf")          # every key -inf: reference gives zeros
    scores[0, 0, 1, :20] = float("-inf")
    p = ops.scale_mask_softmax(scores)
    torch.testing.assert_close(p, ref.scale_mask_softmax(scores))


# ---- int8 --------------------------------------------------------------------------------------
def spec_quantize(x):
    """kernels.h semantics: inv = 127/amax as one IEEE division (reference.py's `127 / amax` is
    evaluated by torch as amax.reciprocal() * 127, one rounding more)."""
    xf = x.float()
    amax = xf.abs().amax(-1) if x.shape[-1] > 0 else xf.new_zeros(x.shape[:-1])
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, amax / 127


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 31), (4, 32), (17, 33), (64, 100), (7, 1000),
                                   (2, 4099), (300, 4096), (2, 3, 65)])
def test_quantize_bit_exact(dtype, shape):
    x = gen(*shape, dtype=dtype, scale=3.0)
    if x.dim() == 2 and x.shape[0] > 2:
        x[1] = 0
    q, s = ops.quantize_per_token(x)
    eq, es = spec_quantize(x)
    assert torch.equal(q, eq) and torch.equal(s, es)
    rq, rs = ref.quantize_per_token(x)
    assert torch.equal(s, rs)
    assert int((q.int() - rq.int()).abs().max()) <= 1 if q.numel() else True
    xm = misaligned(x)
    q2, s2 = ops.quantize_per_token(xm)
    assert torch.equal(q2, eq) and torch.equal(s2, es)


def test_quantize_empty_rows():
    q, s = torch.ops.megapre.quantize_rowwise(gen(3, 0))
    assert q.shape == (3, 0) and torch.equal(s, torch.zeros(3, device=DEV))
    q, s = torch.ops.megapre.quantize_rowwise(gen(0, 5))
    assert q.shape == (0, 5) and s.shape == (0,)


def test_quantize_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.49] * 4], device=DEV)
    q, s = ops.quantize_per_token(x)
    expect = torch.tensor([127, 0, 2, 2, 0, -2, -2, 126, -126, 3] * 4, dtype=torch.int8, device=DEV)
    assert torch.equal(q[0], expect) and float(s[0]) == 1.0


def int8s(*shape, seed=0, lo=-127):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, 128, shape, dtype=torch.int8, generator=g).to(DEV)


# tensor-core path: M > 16, K % 8 == 0, N % 8 == 0; otherwise CUDA cores: small-M kernel
# (M <= 16, K % 16 == 0) or the tiled kernel.
GEMM_SHAPES = [(1, 8, 16), (1, 1000, 1024), (3, 33, 100), (5, 17, 3), (16, 64, 4112), (16, 24, 40),
               (17, 64, 64), (64, 64, 64), (300, 128, 1024), (130, 300, 1100), (33, 20, 7),
               (100, 3, 17), (20, 24, 8200), (1, 1, 1)]


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_int8_gemm_bit_exact(out_dtype, M, N, K):
    x, w = int8s(M, K), int8s(N, K, seed=1)
    xs = torch.rand(M, device=DEV) * 0.01 + 1e-3
    ws = torch.rand(N, device=DEV) * 0.01 + 1e-3
    bias = gen(N, seed=2) if (M + N) % 2 else None
    out = ops.int8_gemm(x, xs, w, ws, bias, out_dtype)
    exp = ref.int8_gemm(x, xs, w, ws, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert torch.equal(out, exp)  # exact int32 accumulation, same epilogue order


def test_int8_gemm_extremes_and_misaligned():
    M, N, K = 24, 16, 4096
    x = torch.full((M, K), 127, dtype=torch.int8, device=DEV)
    w = torch.full((N, K), -127, dtype=torch.int8, device=DEV)
    w[::2] = 127
    xs, ws = torch.ones(M, device=DEV), torch.ones(N, device=DEV)
    for xx, wwt in [(x, w), (misaligned(x[:5]), misaligned(w)), (x[:5], w)]:
        m = xx.shape[0]
        out = ops.int8_gemm(xx, xs[:m], wwt, ws)
        assert torch.equal(out, ref.int8_gemm(xx, xs[:m], wwt, ws))


def test_int8_gemm_zero_sizes():
    w, ws = int8s(8, 16), torch.ones(8, device=DEV)
    out = ops.int8_gemm(int8s(0, 16), torch.ones(0, device=DEV), w, ws)
    assert out.shape == (0, 8)
    bias = gen(8)
    out = torch.ops.megapre.int8_gemm(int8s(20, 0), torch.ones(20, device=DEV), int8s(8, 0),
                                      ws, bias, torch.float32)
    torch.testing.assert_close(out, bias.expand(20, 8))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("M,N,K", [(1, 8, 16), (1, 4096, 4096), (2, 33, 48), (3, 70, 100), (5, 64, 1024),
                                   (8, 20, 2064), (11, 40, 515), (16, 65, 1056), (17, 64, 64),
                                   (64, 300, 1000), (1, 3, 1)])
def test_weight_only_int8(dtype, M, N, K):
    x = gen(M, K, dtype=dtype)
    w = int8s(N, K, seed=1)
    ws = torch.rand(N, device=DEV) * 0.01 + 1e-3
    bias = gen(N, seed=2) if N % 2 == 0 else None
    out = ops.weight_only_int8_linear(x, w, ws, bias)
    exp = ref.weight_only_int8_linear(x, w, ws, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    atol, rtol = TOL[dtype]
    # M > 16 rounds the dequantized weights to dtype before a tensor-core GEMM
    step = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    extra = 0.0 if M <= 16 else 5 * step * K ** 0.5 * float(ws.max()) * 127
    torch.testing.assert_close(out.float(), exp.float(), atol=atol * 4 + 1e-4 * K ** 0.5 + extra,
                               rtol=rtol * 4)
    if M <= 16:
        torch.testing.assert_close(ops.weight_only_int8_linear(x, misaligned(w), ws, bias).float(),
                                   out.float(), atol=atol, rtol=rtol)


# ---- glue: errors, streams, devices ----------------------------------------------------------
def test_bad_inputs_raise():
    x = gen(4, 32)
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.megapre.norm_fwd(gen(2, 3, 4), None, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.megapre.norm_fwd(x.double(), None, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="different devices|must be a CUDA tensor"):
        torch.ops.megapre.norm_fwd(x, x.cpu(), None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.megapre.norm_fwd(x, None, gen(31), None, 1e-5, False)
    with pytest.raises(RuntimeError, match="bool"):
        torch.ops.megapre.scale_mask_softmax_fwd(gen(1, 1, 4, 4), gen(1, 1, 4, 4), 1.0, False)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.megapre.int8_gemm(x, torch.ones(4, device=DEV), int8s(8, 32), torch.ones(8, device=DEV),
                                    None, torch.float32)
    with pytest.raises(RuntimeError, match="K mismatch"):
        torch.ops.megapre.weight_only_int8_gemm(x, int8s(8, 16), torch.ones(8, device=DEV), None)


def test_runs_on_current_stream():
    s = torch.cuda.Stream()
    x = gen(64, 1024)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = ops.layer_norm(x, None, None)
        p = ops.scale_mask_softmax(x.view(1, 1, 64, 1024), causal=True)
    s.synchronize()
    close(y, ref.layer_norm(x, None, None), torch.float32, scale=4)
    close(p, ref.scale_mask_softmax(x.view(1, 1, 64, 1024), causal=True), torch.float32)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x = gen(8, 256).to("cuda:1")
    close(ops.rms_norm(x, None), ref.rms_norm(x, None), torch.float32, scale=4)
    q, s = ops.quantize_per_token(x)
    assert q.device == x.device and torch.equal(q, spec_quantize(x)[0])
