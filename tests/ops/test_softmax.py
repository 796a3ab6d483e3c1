"""Fused scale + mask + softmax: megapre.ops.scale_mask_softmax (compiled CPU kernels, scalar,
AVX2 and AVX-512 paths via the `isa` fixture) against megapre.ops.reference, forward and backward, over
shapes (odd, sq != sk, huge sk), dtypes, mask layouts, causal, fully masked rows, zero-size
inputs and bad arguments."""
from __future__ import annotations

import math

import pytest
import torch

import megapre.ops as ops
from megapre.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) of one op against the reference in the same dtype: both round the same fp32
# math to the output dtype, so they may differ by about one unit in the last place.
TOL = {torch.float32: (2e-6, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}
SHAPES = [  # [b, h, sq, sk]
    (2, 3, 1, 1),
    (2, 2, 5, 5),
    (1, 2, 17, 17),
    (2, 1, 5, 17),    # sq < sk: causal keeps a prefix of sk - sq + 1 or more keys
    (2, 1, 17, 5),    # sq > sk: causal leaves the first rows with no key at all
    (1, 2, 9, 512),
    (1, 1, 512, 512),
    (1, 1, 3, 4097),
    (1, 1, 4097, 5),
]
MASKS = ["none", "b1", "11", "keypad", "fullrows", "strided"]


def make_mask(kind: str, b: int, sq: int, sk: int, gen: torch.Generator):
    if kind == "none":
        return None
    if kind == "b1":  # the usual per-batch mask [b, 1, sq, sk]
        return torch.rand(b, 1, sq, sk, generator=gen) < 0.3
    if kind == "11":  # one mask for the whole batch
        return torch.rand(1, 1, sq, sk, generator=gen) < 0.3
    if kind == "keypad":  # key padding [b, 1, 1, sk]: broadcast along sq too
        lengths = torch.randint(0, sk + 1, (b,), generator=gen)
        return (torch.arange(sk)[None, :] >= lengths[:, None])[:, None, None, :]
    if kind == "fullrows":  # every third query sees nothing
        m = torch.rand(b, 1, sq, sk, generator=gen) < 0.3
        m[:, :, ::3] = True
        return m
    if kind == "tails":  # key padding of lengths around the kernels' 16/32-key steps
        lengths = torch.tensor([0, 1, 15, 16, 31, 32, 33, 64, sk - 1, sk])[:b].clamp(max=sk)
        return (torch.arange(sk)[None, :] >= lengths[:, None])[:, None, None, :]
    if kind == "sparse":  # one hidden key per query, at each of the kernels' step edges,
        m = torch.zeros(b, 1, sq, sk, dtype=torch.bool)  # and batch 1 also padded
        for q, pos in enumerate([0, 15, 16, 31, 32, 33, 63, 64, 70, sk - 12][:sq]):
            m[:, :, q, min(pos, sk - 1)] = True
        m[1:, :, :, sk - 11:] = True
        return m
    if kind == "strided":  # not contiguous along sk (a transposed mask)
        return (torch.rand(b, 1, sk, sq, generator=gen) < 0.3).transpose(2, 3)
    raise AssertionError(kind)


def hidden(mask, causal, shape):
    """Where the probabilities must be exactly 0."""
    b, h, sq, sk = shape
    out = torch.zeros(shape, dtype=torch.bool)
    if mask is not None:
        out |= mask.expand(shape)
    if causal:
        out |= reference.causal_mask(sq, sk)
    return out


def run(fn, scores, mask, scale, causal, dy):
    x = scores.detach().clone().requires_grad_()
    p = fn(x, mask, scale, causal)
    p.backward(dy)
    return p.detach(), x.grad


def check_against_reference(shape, dtype, mask_kind, causal, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, sq, sk = shape
    scores = (torch.randn(shape, generator=gen) * 4).to(dtype)
    if mask_kind == "fullrows" and sk > 2:
        scores[..., 1] = -math.inf  # -inf scores must not turn masked rows into NaN
    mask = make_mask(mask_kind, b, sq, sk, gen)
    dy = torch.randn(shape, generator=gen).to(dtype)

    p, dx = run(ops.scale_mask_softmax, scores, mask, scale, causal, dy)
    p_ref, dx_ref = run(reference.scale_mask_softmax, scores, mask, scale, causal, dy)

    assert p.dtype == dtype and p.shape == scores.shape and dx.dtype == dtype
    assert not torch.isnan(p).any() and not torch.isnan(dx).any()
    zero = hidden(mask, causal, shape)
    assert (p[zero] == 0).all(), "masked probabilities must be exactly 0"
    assert (dx[zero] == 0).all(), "masked gradients must be exactly 0"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(p, p_ref, atol=atol, rtol=rtol)
    # dscores = scale * p * (dy - <dy, p>): errors in p scale by |scale * (dy - <dy, p>)| <~ 10.
    torch.testing.assert_close(dx, dx_ref, atol=atol * 10 * abs(scale), rtol=rtol * 4)
    # rows with a visible finite score sum to 1
    live = (~zero & torch.isfinite(scores)).any(-1)
    sums = p.float().sum(-1)[live]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=sk * atol + 1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp32_against_reference(isa, shape, mask_kind, causal):
    check_against_reference(shape, torch.float32, mask_kind, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 5, 5), (2, 1, 17, 5), (1, 2, 9, 512), (1, 1, 3, 4097)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "b1", "fullrows"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_half_against_reference(isa, dtype, shape, mask_kind, causal):
    check_against_reference(shape, dtype, mask_kind, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_sk(isa, dtype):
    check_against_reference((1, 1, 2, 8192), dtype, "b1", True, scale=0.125)


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (1, 4, 1024, 1031)),
                                          (torch.bfloat16, (1, 8, 1024, 1031))], ids=str)
def test_large_output_streaming_path(isa, dtype, shape):
    """Outputs of 16 MiB and more take the non-temporal-store path; odd sk leaves rows
    misaligned with cache lines, so ragged row ends and causal zero tails are exercised."""
    if isa in ("scalar", "reference"):
        pytest.skip("only the vector (AVX2, AVX-512) rows stream")
    check_against_reference(shape, dtype, "b1", True, scale=0.125)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_tails(isa, dtype, causal):
    """The masked tail of a padded row is skipped and written as zeros: lengths 0, 1, around
    16 and 32, and sk - 1, sk, with an sk that leaves rows unaligned."""
    check_against_reference((10, 2, 3, 100), dtype, "tails", causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_mask_in_live_prefix(isa, dtype):
    """A single hidden key anywhere before a row's padded tail is still seen (rows whose live
    prefix has no hidden key skip the mask)."""
    check_against_reference((2, 2, 10, 100), dtype, "sparse", False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_row_stays_nan(isa, dtype):
    """A NaN score makes its row's visible probabilities NaN (as in torch) and no other row's."""
    scores = torch.randn(1, 2, 4, 40).to(dtype)
    scores[0, 1, 2, 5] = math.nan
    mask = torch.zeros(1, 1, 4, 40, dtype=torch.bool)
    mask[..., 30:] = True
    p = ops.scale_mask_softmax(scores, mask, 0.5)
    assert torch.isnan(p[0, 1, 2, :30]).all()
    p[0, 1, 2] = 0
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("scale", [1.0, -0.7, 20.0])
def test_scales(isa, scale):
    check_against_reference((1, 2, 17, 40), torch.float32, "b1", True, scale=scale)


def test_fully_masked_rows_are_zero(isa):
    scores = torch.randn(2, 2, 4, 9)
    scores[0, 0, 1] = -math.inf  # unmasked but all -inf: still zeros, not NaN
    mask = torch.zeros(2, 1, 4, 9, dtype=torch.bool)
    mask[:, :, 2] = True
    x = scores.clone().requires_grad_()
    p = ops.scale_mask_softmax(x, mask, 0.5)
    p.backward(torch.randn_like(p))
    for t in (p, x.grad):
        assert not torch.isnan(t).any()
        assert (t[:, :, 2] == 0).all() and (t[0, 0, 1] == 0).all()
    # causal with sq > sk: queries 0..sq-sk-1 see no key
    p = ops.scale_mask_softmax(torch.randn(1, 1, 6, 2), causal=True)
    assert (p[0, 0, :4] == 0).all() and torch.allclose(p[0, 0, 4:].sum(-1), torch.ones(2))


def test_causal_and_mask_combine(isa):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 2, 7, 11, generator=gen)
    mask = torch.rand(2, 1, 7, 11, generator=gen) < 0.4
    both = ops.scale_mask_softmax(scores, mask, 1.0, causal=True)
    manual = ops.scale_mask_softmax(scores, mask | reference.causal_mask(7, 11), 1.0)
    torch.testing.assert_close(both, manual, atol=1e-6, rtol=1e-5)


def test_non_contiguous_scores(isa):
    scores = torch.randn(2, 3, 16, 16).transpose(2, 3)
    mask = torch.rand(2, 1, 16, 16) < 0.2
    torch.testing.assert_close(ops.scale_mask_softmax(scores, mask, 0.5),
                               reference.scale_mask_softmax(scores, mask, 0.5),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (2, 0, 3, 4), (2, 2, 0, 4), (2, 2, 3, 0)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_zero_size(isa, shape, causal):
    b, h, sq, sk = shape
    x = torch.randn(shape, requires_grad=True)
    mask = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    p = ops.scale_mask_softmax(x, mask, 0.5, causal)
    assert p.shape == shape
    p.sum().backward()
    assert x.grad.shape == shape


def test_module(isa):
    mod = ops.FusedScaleMaskSoftmax(scale=0.25, causal=True)
    assert "scale=0.25" in repr(mod) and "causal=True" in repr(mod)
    x = torch.randn(2, 2, 5, 8, requires_grad=True)
    mask = torch.rand(2, 1, 5, 8) < 0.3
    p = mod(x, mask)
    torch.testing.assert_close(p, reference.scale_mask_softmax(x.detach(), mask, 0.25, True),
                               atol=2e-6, rtol=1e-5)
    p.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert mod(x.detach()).shape == x.shape  # mask is optional


def test_opcheck():
    """Schema, fake (meta) impl and autograd registration agree with the real kernel."""
    if ops.backend_info()["cpu"] != "compiled":
        pytest.skip("compiled kernels not loaded")
    x = torch.randn(2, 2, 5, 7, requires_grad=True)
    mask = torch.rand(2, 1, 5, 7) < 0.3
    torch.library.opcheck(torch.ops.megapre.scale_mask_softmax_fwd.default, (x, mask, 0.5, True))
    torch.library.opcheck(torch.ops.megapre.scale_mask_softmax_fwd.default, (x, None, 1.0, False))


@pytest.mark.parametrize(
    "scores, mask, exc, match",
    [
        (torch.randn(2, 5, 5), None, ValueError, "4-D"),
        (torch.randn(1, 1, 5, 5).int(), None, TypeError, "dtype"),
        (torch.randn(1, 1, 5, 5), torch.zeros(1, 1, 5, 5), TypeError, "bool"),
        (torch.randn(1, 1, 5, 5), torch.zeros(1, 1, 5, 5, dtype=torch.uint8), TypeError, "bool"),
        (torch.randn(2, 1, 5, 5), torch.zeros(3, 1, 5, 5, dtype=torch.bool), ValueError, "broadcast"),
        (torch.randn(1, 1, 5, 5), torch.zeros(1, 1, 5, 6, dtype=torch.bool), ValueError, "broadcast"),
        (torch.randn(1, 1, 5, 5), torch.zeros(5, 5, dtype=torch.bool), ValueError, "broadcast"),
        ("scores", None, TypeError, "Tensor"),
    ],
    ids=["3d-scores", "int-scores", "float-mask", "uint8-mask", "batch-mismatch", "sk-mismatch",
         "2d-mask", "not-a-tensor"],
)
def test_bad_input(scores, mask, exc, match):
    with pytest.raises(exc, match=match):
        ops.scale_mask_softmax(scores, mask)


def test_bad_input_direct_op():
    """The C++ glue rejects what the Python layer would, for direct torch.ops calls."""
    if ops.backend_info()["cpu"] != "compiled":
        pytest.skip("compiled kernels not loaded")
    op = torch.ops.megapre.scale_mask_softmax_fwd
    with pytest.raises(RuntimeError, match="4-D"):
        op(torch.randn(5, 5), None, 1.0, False)
    with pytest.raises(RuntimeError, match="bool"):
        op(torch.randn(1, 1, 5, 5), torch.zeros(1, 1, 5, 5), 1.0, False)
    with pytest.raises(RuntimeError, match="broadcast"):
        op(torch.randn(1, 1, 5, 5), torch.zeros(1, 1, 5, 4, dtype=torch.bool), 1.0, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_rounding_is_unbiased(isa, dtype):
    """Outputs are rounded to nearest (not truncated): the mean error against float64, in units
    of the output's last place, is about 0 (truncation would give about -0.5)."""
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(4, 4, 16, 96, generator=gen).to(dtype)
    dy = torch.randn(scores.shape, generator=gen).to(dtype)
    p, dx = run(ops.scale_mask_softmax, scores, None, 0.5, False, dy)
    p64 = reference.scale_mask_softmax(scores.double(), None, 0.5, False)
    # backward truth from the kernel's own (rounded) probabilities, which it reads back
    dx64 = 0.5 * p.double() * (dy.double() - (dy.double() * p.double()).sum(-1, keepdim=True))
    for got, want in ((p, p64), (dx, dx64)):
        want_r = want.to(dtype)
        ulp = (torch.nextafter(want_r.abs(), torch.tensor(math.inf, dtype=dtype)).double()
               - want_r.abs().double())
        keep = want.abs() > 1e-3
        bias = ((got.double() - want) / ulp)[keep].mean().item()
        assert abs(bias) < 0.1, bias


def test_torch_compile_fullgraph(isa):
    """The fake and autograd registrations let dynamo/AOTAutograd trace forward + backward."""
    torch._dynamo.reset()

    def f(scores, mask):
        return (ops.scale_mask_softmax(scores, mask, scale=0.5, causal=True) * scores).sum()

    scores = torch.randn(2, 3, 5, 7, requires_grad=True)
    mask = torch.rand(2, 1, 5, 7) > 0.7
    (eager_grad,) = torch.autograd.grad(f(scores, mask), [scores])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(scores, mask)
    (grad,) = torch.autograd.grad(out, [scores])
    torch.testing.assert_close(out, f(scores, mask))
    torch.testing.assert_close(grad, eager_grad)
