"""Int8 family: quantize_per_token / quantize_per_channel, int8_gemm (W8A8), int8_linear,
weight_only_int8_linear and Int8Linear, against megapre.ops.reference and exact float64 math,
on every CPU kernel path the machine has (the `isa` fixture: scalar, AVX2, AVX-512 VNNI), over
shapes that hit every tail of the kernels' tiling (M % 6, N % 16 / 64, K % 2 / 4 / 16 / 32 / 64,
K blocks, row chunks, column tasks, small-M paths)."""
from __future__ import annotations

import pytest
import torch

import megapre.ops as ops
from megapre.ops import reference as ref

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# Output rounding of each dtype (relative) and the smallest magnitudes it resolves.
# Output rounding relative to the result: fp32 takes two roundings in the epilogue (acc * scale,
# then + bias), so 2 ulp; the half types take one rounding of their own (plus the fp32 ones).
REL = {torch.float32: 2.0**-22, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ABS = {torch.float32: 1e-30, torch.float16: 1e-7, torch.bfloat16: 1e-30}

GEMM_SHAPES = [  # (M, N, K)
    (1, 1, 1), (1, 3, 17), (2, 17, 33), (3, 33, 100), (4, 64, 4099), (1, 1000, 1000),
    (5, 17, 3), (6, 16, 32), (7, 1, 1), (17, 100, 1000), (64, 64, 64), (100, 3, 17),
    (300, 130, 70), (130, 300, 1100),
]


def gen(*shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def int8s(*shape, lo=-127, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, 128, shape, dtype=torch.int8, generator=g)


def exact_gemm(x_int8, w_int8):
    """x @ w.T in int64: the exact int32 accumulation the kernels must reproduce."""
    return x_int8.long() @ w_int8.long().t()


# ---- quantization ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 31), (4, 32), (17, 33), (64, 100),
                                  (7, 1000), (2, 4099), (2, 3, 65), (40,)])
def test_quantize_per_token_bit_exact(isa, dtype, shape):
    x = gen(*shape, dtype=dtype)
    if x.dim() == 2 and x.shape[0] > 2:
        x[1] = 0  # all-zero row: scale 0, q 0
    q, s = ops.quantize_per_token(x)
    rq, rs = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(q, rq)
    assert torch.equal(s, rs)
    assert int(q.abs().max()) <= 127
    # and the quantization itself is what it claims: q * scale within half a step of x
    err = (q.float() * s.unsqueeze(-1) - x.float()).abs()
    assert bool((err <= 0.5 * s.unsqueeze(-1) * (1 + 1e-5) + 1e-30).all())


def test_quantize_rounds_half_to_even(isa):
    # amax 127 makes inv 1: x * inv is x itself, so ties land exactly on .5
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.49] * 4])
    q, s = ops.quantize_per_token(x)
    expect = torch.tensor([127, 0, 2, 2, 0, -2, -2, 126, -126, 3] * 4, dtype=torch.int8)
    assert torch.equal(q[0], expect) and float(s[0]) == 1.0


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_channel_bit_exact(isa, dtype):
    w = gen(300, 129, dtype=dtype, scale=0.05)
    q, s = ops.quantize_per_channel(w)
    rq, rs = ref.quantize_per_channel(w)
    assert torch.equal(q, rq) and torch.equal(s, rs) and s.shape == (300,)


def test_quantize_zero_size(isa):
    q, s = ops.quantize_per_token(torch.empty(0, 8))
    assert q.shape == (0, 8) and s.shape == (0,)
    q, s = ops.quantize_per_token(torch.empty(3, 0))
    assert q.shape == (3, 0) and torch.equal(s, torch.zeros(3))


# ---- int8_gemm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_int8_gemm_bit_exact(isa, M, N, K):
    x = int8s(M, K, lo=-128, seed=1)  # activations may be -128
    w = int8s(N, K, seed=2)
    xs = torch.rand(M, generator=torch.Generator().manual_seed(3)) + 0.01
    ws = torch.rand(N, generator=torch.Generator().manual_seed(4)) + 0.01
    acc = exact_gemm(x, w)
    for out_dtype, with_bias in [(torch.float32, True), (torch.float32, False),
                                 (torch.float16, True), (torch.bfloat16, False)]:
        bias = gen(N, seed=5) if with_bias else None
        out = ops.int8_gemm(x, xs, w, ws, bias, out_dtype=out_dtype)
        expect = ref.int8_gemm(x, xs, w, ws, bias, out_dtype=out_dtype)
        assert out.dtype == out_dtype and out.shape == (M, N)
        assert torch.equal(out, expect), (out_dtype, with_bias, (out.float() - expect.float()).abs().max())
    # the reference's epilogue itself is the spec: float(acc) * xs * ws
    out = ops.int8_gemm(x, xs, w, ws)
    assert torch.equal(out, acc.float() * xs[:, None] * ws)


def test_int8_gemm_extreme_values(isa):
    # every product at its largest magnitude, long K: sums far beyond int16, exact in int32
    for M, N, K in [(1, 9, 5000), (5, 17, 5000), (64, 32, 2048)]:
        x = torch.full((M, K), -128, dtype=torch.int8)
        w = torch.full((N, K), -127, dtype=torch.int8)
        w[::2] = 127
        out = ops.int8_gemm(x, torch.ones(M), w, torch.ones(N))
        assert torch.equal(out, exact_gemm(x, w).float())


def test_int8_gemm_batched_and_noncontiguous(isa):
    x = int8s(2, 5, 40, lo=-128)
    w = int8s(24, 40)
    xs, ws = torch.rand(2, 5), torch.rand(24)
    out = ops.int8_gemm(x, xs, w, ws)
    assert out.shape == (2, 5, 24)
    assert torch.equal(out, ref.int8_gemm(x, xs, w, ws))
    wt = int8s(40, 24).t()  # [24, 40] view, not contiguous
    assert torch.equal(ops.int8_gemm(x, xs, wt, ws), ref.int8_gemm(x, xs, wt.contiguous(), ws))


@pytest.mark.parametrize("M,N,K", [(0, 5, 7), (3, 0, 7), (3, 5, 0), (0, 0, 0)])
def test_int8_gemm_zero_size(isa, M, N, K):
    x, w = int8s(M, K), int8s(N, K)
    bias = gen(N)
    out = ops.int8_gemm(x, torch.rand(M), w, torch.rand(N), bias)
    assert out.shape == (M, N)
    assert torch.equal(out, ref.int8_gemm(x, torch.rand(M), w, torch.rand(N), bias))


def test_int8_gemm_rejects_minus_128(isa):
    for M, N, K in [(1, 3, 5), (4, 64, 4099), (17, 100, 100), (300, 33, 70), (0, 4, 4)]:
        w = int8s(N, K)
        w.view(-1)[(N * K) // 2 + 1] = -128
        with pytest.raises(ValueError, match="-128"):
            ops.int8_gemm(int8s(M, K), torch.ones(M), w, torch.ones(N))
        with pytest.raises(ValueError, match="-128"):
            ops.int8_linear(gen(M, K), w, torch.ones(N))


# Shapes aimed at the AVX-512 VNNI kernels' edges (they run on every ISA): K % 4 (dword
# broadcasts) and K % 64 (masked tails), K blocks of 512, M % 6 (row panels), the 48-row
# chunk, N % 64 (column micro-panels), the 256-column task width, few column blocks (split
# over rows), and the small-M path (M <= 4) that reads w in place.
VNNI_EDGE_SHAPES = [  # (M, N, K)
    (1, 67, 1), (2, 65, 2), (3, 64, 3), (4, 63, 5), (5, 1, 67), (6, 2, 64), (7, 3, 65),
    (11, 66, 511), (13, 129, 513), (47, 7, 1023), (48, 64, 1024), (49, 65, 1027),
    (67, 257, 130), (97, 300, 4097), (200, 5, 260), (1, 600, 4097),
]


@pytest.mark.parametrize("M,N,K", VNNI_EDGE_SHAPES)
def test_int8_gemm_exact_edge_shapes(isa, M, N, K):
    x = int8s(M, K, lo=-128, seed=M)
    w = int8s(N, K, seed=N)
    xs = torch.rand(M, generator=torch.Generator().manual_seed(K)) + 0.01
    ws = torch.rand(N, generator=torch.Generator().manual_seed(K + 1)) + 0.01
    # float32 out, no bias: exactly float(int64 dot) * xs * ws
    assert torch.equal(ops.int8_gemm(x, xs, w, ws), exact_gemm(x, w).float() * xs[:, None] * ws)
    bias = gen(N, seed=3)
    for out_dtype in FLOATS:
        out = ops.int8_gemm(x, xs, w, ws, bias, out_dtype=out_dtype)
        assert out.dtype == out_dtype
        assert torch.equal(out, ref.int8_gemm(x, xs, w, ws, bias, out_dtype=out_dtype)), out_dtype


def test_int8_gemm_int32_wraparound_exact(isa):
    # u = w + 128 makes the VNNI accumulator sum_k u * x = dot + 128 * sum_k x, which leaves
    # int32 here (-32640 * K < -2^31) while the dot product itself still fits: the kernel's
    # wrapping arithmetic must give the exact dot back.
    K = 66000
    x = torch.full((13, K), -128, dtype=torch.int8)
    w = torch.full((3, K), 127, dtype=torch.int8)
    w[1] = -127
    w[2, ::2] = -127
    expect = exact_gemm(x, w)
    assert int(expect.abs().max()) < 2**31
    for M in (1, 7, 13):  # small-M paths (AVX2 up to 4 rows, VNNI up to 8) and blocked
        out = ops.int8_gemm(x[:M], torch.ones(M), w, torch.ones(3))
        assert torch.equal(out, expect[:M].float())


def test_int8_gemm_large_x(isa):
    # x beyond the 32 MiB the kernels keep as per-thread scratch (packed / widened copies of x
    # then come from a one-off allocation): still exact
    M, N, K = 8200, 5, 4096
    x = int8s(M, K, lo=-128, seed=11)
    w = int8s(N, K, seed=12)
    out = ops.int8_gemm(x, torch.ones(M), w, torch.ones(N))
    for i in range(0, M, 2048):
        assert torch.equal(out[i:i + 2048], exact_gemm(x[i:i + 2048], w).float()), i


@pytest.mark.parametrize("M,N,K", [(2, 65, 7), (13, 65, 7), (9, 300, 515), (3, 17, 4097)])
def test_int8_gemm_rejects_minus_128_in_tails(isa, M, N, K):
    # the last weight of the last row: inside the K tail and the last column micro-panel
    w = int8s(N, K)
    w[-1, -1] = -128
    with pytest.raises(ValueError, match="-128"):
        ops.int8_gemm(int8s(M, K), torch.ones(M), w, torch.ones(N))
    w[-1, -1] = 0
    w[0, 0] = -128
    with pytest.raises(ValueError, match="-128"):
        ops.int8_gemm(int8s(M, K), torch.ones(M), w, torch.ones(N))


def test_cpu_isa_selection():
    if ops.backend_info()["cpu"] != "compiled":
        pytest.skip("compiled CPU kernels not built")
    import megapre._C as C

    best = "avx512vnni" if C.cpu_has_avx512vnni() else ("avx2" if C.cpu_has_avx2() else "scalar")
    ops.set_cpu_isa("auto")
    assert ops.cpu_isa() == best and ops.backend_info()["cpu_isa"] == best
    with pytest.raises(ValueError, match="expected 'auto'"):
        ops.set_cpu_isa("avx1024")
    try:
        for name, has in [("avx2", C.cpu_has_avx2()), ("avx512vnni", C.cpu_has_avx512vnni())]:
            if has:
                ops.set_cpu_isa(name)
                assert ops.cpu_isa() == name
            else:  # a CPU without it gets a clear error, not SIGILL later
                with pytest.raises(ValueError, match="lacks"):
                    ops.set_cpu_isa(name)
    finally:
        ops.set_cpu_isa("auto")



def test_int8_gemm_bad_inputs():
    x, w = int8s(4, 8), int8s(3, 8)
    xs, ws = torch.ones(4), torch.ones(3)
    with pytest.raises(ValueError, match="K mismatch"):
        ops.int8_gemm(x, xs, int8s(3, 9), ws)
    with pytest.raises(TypeError, match="x_int8 must be int8"):
        ops.int8_gemm(x.float(), xs, w, ws)
    with pytest.raises(TypeError, match="w_int8 must be int8"):
        ops.int8_gemm(x, xs, w.to(torch.uint8), ws)
    with pytest.raises(TypeError, match="x_scale must be float32"):
        ops.int8_gemm(x, xs.half(), w, ws)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        ops.int8_gemm(x, xs, w, torch.ones(4))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.int8_gemm(x, xs, w, ws, torch.ones(4))
    with pytest.raises(TypeError, match="out_dtype"):
        ops.int8_gemm(x, xs, w, ws, out_dtype=torch.int32)
    # the raw op validates too (no Python layer in front of it)
    with pytest.raises(RuntimeError, match="K mismatch"):
        torch.ops.megapre.int8_gemm(x, xs, int8s(3, 9), ws, None, torch.float32)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.megapre.weight_only_int8_gemm(torch.randn(4, 8), w.float(), ws, None)


# ---- linears -----------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 4, 16, 17, 300])
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_linear_bit_exact(isa, M, dtype):
    N, K = 130, 257
    x = gen(M, K, dtype=dtype, seed=M)
    wq, ws = ref.quantize_per_channel(gen(N, K, scale=0.05, seed=7))
    bias = gen(N, seed=8)
    out = ops.int8_linear(x, wq, ws, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    assert torch.equal(out, ref.int8_linear(x, wq, ws, bias))


def wo_bound(x, wq, ws, exact, dtype):
    """fp32 accumulation error (any order) plus the output dtype's rounding."""
    mag = (x.double().abs() @ wq.double().abs().t()) * ws.double()
    return 2e-5 * mag + REL[dtype] * exact.abs() + ABS[dtype]


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 16, 17, 40, 300])
@pytest.mark.parametrize("dtype", FLOATS)
def test_weight_only_int8_linear(isa, M, dtype):
    N, K = 67, 1000
    x = gen(M, K, dtype=dtype, seed=M)
    wq = int8s(N, K, lo=-128, seed=9)  # weight-only takes the full int8 range
    ws = torch.rand(N, generator=torch.Generator().manual_seed(10)) / 100
    bias = gen(N, seed=11)
    out = ops.weight_only_int8_linear(x, wq, ws, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    exact = (x.double() @ wq.double().t()) * ws.double() + bias.double()
    err = (out.double() - exact).abs()
    bound = wo_bound(x, wq, ws, exact, dtype)
    assert bool((err <= bound).all()), float((err / bound).max())
    expect = ref.weight_only_int8_linear(x, wq, ws, bias)
    assert bool(((out.double() - expect.double()).abs() <= 2 * bound).all())


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (2, 3, 7), (3, 17, 8), (16, 100, 17), (17, 33, 1000),
                                   (40, 100, 3), (300, 130, 600), (7, 16, 4099)])
def test_weight_only_shapes(isa, M, N, K):
    for dtype in FLOATS:
        x = gen(M, K, dtype=dtype)
        wq = int8s(N, K, lo=-128, seed=1)
        ws = torch.rand(N) / 100
        out = ops.weight_only_int8_linear(x, wq, ws)
        exact = (x.double() @ wq.double().t()) * ws.double()
        err = (out.double() - exact).abs()
        bound = wo_bound(x, wq, ws, exact, dtype)
        assert bool((err <= bound).all()), (dtype, float((err / bound).max()))


@pytest.mark.parametrize("M,N,K", [(1, 4099, 67), (1, 37, 4099), (2, 531, 300), (3, 77, 1030),
                                   (8, 300, 515)])
def test_weight_only_gemv_shapes(isa, M, N, K):
    # the small-M streaming kernels: 16-row blocks and their remainder, prefetch across
    # blocks, masked K tails, whole-range passes (M <= 3) and 4-row chunks of x
    x = gen(M, K, seed=K)
    wq = int8s(N, K, lo=-128, seed=N)
    ws = torch.rand(N, generator=torch.Generator().manual_seed(5)) / 100  # once failed at 0 ulp slack
    bias = gen(N, seed=1)
    out = ops.weight_only_int8_linear(x, wq, ws, bias)
    exact = (x.double() @ wq.double().t()) * ws.double() + bias.double()
    bound = wo_bound(x, wq, ws, exact, torch.float32)
    assert bool(((out.double() - exact).abs() <= bound).all())


def test_linears_zero_size(isa):
    wq, ws = ref.quantize_per_channel(gen(5, 8))
    for fn in (ops.int8_linear, ops.weight_only_int8_linear):
        assert fn(torch.empty(0, 8), wq, ws).shape == (0, 5)
        assert fn(torch.empty(2, 0, 8), wq, ws).shape == (2, 0, 5)
        out = fn(gen(3, 0), torch.empty(5, 0, dtype=torch.int8), ws, torch.ones(5))
        assert torch.equal(out, torch.ones(3, 5))
        assert fn(gen(3, 8), torch.empty(0, 8, dtype=torch.int8), torch.empty(0)).shape == (3, 0)


def test_linears_bad_inputs():
    wq, ws = ref.quantize_per_channel(gen(5, 8))
    for fn in (ops.int8_linear, ops.weight_only_int8_linear):
        with pytest.raises(ValueError, match="K mismatch"):
            fn(gen(3, 9), wq, ws)
        with pytest.raises(TypeError, match="x must have dtype"):
            fn(torch.ones(3, 8, dtype=torch.int32), wq, ws)
        with pytest.raises(TypeError, match="w_int8 must be int8"):
            fn(gen(3, 8), wq.float(), ws)
        with pytest.raises(TypeError, match="w_scale must be float32"):
            fn(gen(3, 8), wq, ws.double())


# ---- module ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_module(isa, mode, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=bias)
    q = ops.Int8Linear.from_float(lin, mode=mode)
    x = torch.randn(2, 7, 256)
    with torch.no_grad():
        expect = lin(x)
    out = q(x)
    assert out.shape == expect.shape
    # per-channel int8 weights (and per-token int8 activations for w8a8): ~1% of the output scale
    rel = (out - expect).norm() / expect.norm()
    assert float(rel) < (2e-2 if mode == "w8a8" else 1e-2), float(rel)
    assert torch.allclose(out, expect, atol=0.05 * float(expect.abs().max()), rtol=0)

    # state dict round trip: int8 weights + scales (+ bias) restore the same outputs
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["weight_scale"].dtype == torch.float32
    assert ("bias" in sd) == bias
    q2 = ops.Int8Linear(256, 96, bias=bias, mode=mode)
    q2.load_state_dict(sd)
    assert torch.equal(q2(x), out)
    for dtype in (torch.float16, torch.bfloat16):
        y = q(x.to(dtype))
        assert y.dtype == dtype
        assert float((y.float() - expect).norm() / expect.norm()) < 3e-2
