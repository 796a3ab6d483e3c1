"""Tensor-parallel layers and vocab-parallel cross entropy: with the same seed, TP=2 and TP=4 give
the single-process layer's weights, outputs and gradients (rtol 1e-5), with and without sequence
parallelism; the vocabulary is deliberately not divisible by TP."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from megapre.parallel import (ColumnParallelLinear, ParallelConfig, ParallelMesh, RowParallelLinear,
                              VocabParallelEmbedding, gather_full_param, load_full_param,
                              normal_init, padded_vocab_size, sync_sequence_parallel_grads,
                              vocab_parallel_cross_entropy)
from megapre.parallel.testing import run_distributed

S, B, H, FFN, VOCAB = 8, 3, 12, 16, 50
TOL = dict(rtol=1e-5, atol=1e-6)


def _data(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _init(seed: int):
    return normal_init(0.5, torch.Generator().manual_seed(seed))


def _chunk(x: torch.Tensor, mesh: ParallelMesh, dim: int) -> torch.Tensor:
    return x.chunk(mesh.tp_size, dim)[mesh.tp_rank]


def _grad_of(x: torch.Tensor) -> torch.Tensor:
    return x.grad.detach().clone()


def _check_column(mesh: ParallelMesh, single: ParallelMesh, sp: bool, gather: bool) -> None:
    ref = ColumnParallelLinear(H, FFN, single, init_method=_init(1))
    ref.bias.data.normal_(generator=torch.Generator().manual_seed(2))
    lin = ColumnParallelLinear(H, FFN, mesh, init_method=_init(1), sequence_parallel=sp,
                               gather_output=gather)
    assert_close(gather_full_param(lin.weight, mesh), ref.weight.detach(), rtol=0, atol=0)
    load_full_param(lin.bias, ref.bias.detach(), mesh)
    x, g = _data(S, B, H, seed=3), _data(S, B, FFN, seed=4)

    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr * g).sum().backward()
    # same math as torch.nn.Linear with the master weight
    assert_close(yr, F.linear(x, ref.weight, ref.bias), **TOL)

    xp = (_chunk(x, mesh, 0) if sp else x).clone().requires_grad_()
    y = lin(xp)
    expect_y, gp = (yr, g) if gather else (_chunk(yr, mesh, -1), _chunk(g, mesh, -1))
    assert_close(y, expect_y, **TOL)
    (y * gp).sum().backward()
    assert_close(xp.grad, _chunk(xr.grad, mesh, 0) if sp else xr.grad, **TOL)
    assert_close(lin.weight.grad, _chunk(ref.weight.grad, mesh, 0), **TOL)
    assert_close(lin.bias.grad, _chunk(ref.bias.grad, mesh, 0), **TOL)


def _check_row(mesh: ParallelMesh, single: ParallelMesh, sp: bool, input_is_parallel: bool) -> None:
    ref = RowParallelLinear(FFN, H, single, init_method=_init(5))
    ref.bias.data.normal_(generator=torch.Generator().manual_seed(6))
    lin = RowParallelLinear(FFN, H, mesh, init_method=_init(5), sequence_parallel=sp,
                            input_is_parallel=input_is_parallel)
    assert_close(gather_full_param(lin.weight, mesh), ref.weight.detach(), rtol=0, atol=0)
    load_full_param(lin.bias, ref.bias.detach(), mesh)
    x, g = _data(S, B, FFN, seed=7), _data(S, B, H, seed=8)

    xr = x.clone().requires_grad_()
    yr = ref(xr)
    assert_close(yr, F.linear(x, ref.weight, ref.bias), **TOL)
    (yr * g).sum().backward()

    xp = (_chunk(x, mesh, -1) if input_is_parallel else x).clone().requires_grad_()
    y = lin(xp)
    expect_y, gp = (_chunk(yr, mesh, 0), _chunk(g, mesh, 0)) if sp else (yr, g)
    assert_close(y, expect_y, **TOL)
    (y * gp).sum().backward()
    sync_sequence_parallel_grads(lin, mesh)
    assert_close(xp.grad, _chunk(xr.grad, mesh, -1) if input_is_parallel else xr.grad, **TOL)
    assert_close(lin.weight.grad, _chunk(ref.weight.grad, mesh, 1), **TOL)
    assert_close(lin.bias.grad, ref.bias.grad, **TOL)


def _check_mlp(mesh: ParallelMesh, single: ParallelMesh, sp: bool) -> None:
    """Column -> GELU -> Row, the Megatron MLP: two collectives in total per direction."""
    mods = {}
    for name, m in (("ref", single), ("tp", mesh)):
        mods[name] = (ColumnParallelLinear(H, FFN, m, init_method=_init(9), sequence_parallel=sp),
                      RowParallelLinear(FFN, H, m, init_method=_init(10), sequence_parallel=sp))
    x, g = _data(S, B, H, seed=11), _data(S, B, H, seed=12)
    xr = x.clone().requires_grad_()
    yr = mods["ref"][1](F.gelu(mods["ref"][0](xr)))
    (yr * g).sum().backward()
    xp = (_chunk(x, mesh, 0) if sp else x).clone().requires_grad_()
    y = mods["tp"][1](F.gelu(mods["tp"][0](xp)))
    assert_close(y, _chunk(yr, mesh, 0) if sp else yr, **TOL)
    (y * (_chunk(g, mesh, 0) if sp else g)).sum().backward()
    for layer in mods["tp"]:
        sync_sequence_parallel_grads(layer, mesh)
    assert_close(xp.grad, _chunk(xr.grad, mesh, 0) if sp else xr.grad, **TOL)
    for ref, tp in zip(mods["ref"], mods["tp"]):
        for pr, pt in zip(ref.parameters(), tp.parameters()):
            dim = getattr(pt, "tensor_parallel_dim", None)
            assert_close(pt.grad, pr.grad if dim is None else _chunk(pr.grad, mesh, dim), **TOL)


def _check_embedding(mesh: ParallelMesh, single: ParallelMesh, sp: bool) -> None:
    padded = padded_vocab_size(VOCAB, 4, mesh.tp_size)
    ref = nn.Embedding(padded, H)
    emb = VocabParallelEmbedding(padded, H, mesh, init_method=_init(13), sequence_parallel=sp,
                                 vocab_size=VOCAB)
    with torch.no_grad():
        ref.weight.zero_()
        _init(13)(ref.weight[:VOCAB])
    assert_close(gather_full_param(emb.weight, mesh), ref.weight.detach(), rtol=0, atol=0)
    ids = torch.randint(0, VOCAB, (S, B), generator=torch.Generator().manual_seed(14))
    ids[0, 0], ids[1, 0] = 0, VOCAB - 1  # both ends of the vocab
    g = _data(S, B, H, seed=15)
    yr = ref(ids)
    (yr * g).sum().backward()
    y = emb(ids)
    assert_close(y, _chunk(yr, mesh, 0) if sp else yr, **TOL)
    (y * (_chunk(g, mesh, 0) if sp else g)).sum().backward()
    assert_close(emb.weight.grad, _chunk(ref.weight.grad, mesh, 0), **TOL)
    for bad in (VOCAB + 100, -1):
        try:
            emb(torch.tensor([[bad]]))
        except ValueError as e:
            assert f"[0, {VOCAB})" in str(e), e
        else:
            raise AssertionError(f"id {bad} was accepted")


def _check_cross_entropy(mesh: ParallelMesh, single: ParallelMesh) -> None:
    # (vocab, padded): the usual case, and a tiny vocab where whole TP shards are padding
    for vocab, padded in ((VOCAB, padded_vocab_size(VOCAB, 4, mesh.tp_size)), (5, 16)):
        _check_ce_values(mesh, vocab, padded)
    _check_ce_options(mesh, padded_vocab_size(VOCAB, 4, mesh.tp_size))


def _check_ce_values(mesh: ParallelMesh, vocab: int, padded: int) -> None:
    logits = _data(S, B, padded, seed=16) * 4
    logits[..., vocab:] = 1e4  # padding columns must never win, however large
    target = torch.randint(0, vocab, (S, B), generator=torch.Generator().manual_seed(17))
    target[0, 0] = vocab - 1
    for smoothing in (0.0, 0.1):
        ref_in = logits[..., :vocab].clone().requires_grad_()
        ref = F.cross_entropy(ref_in.reshape(-1, vocab), target.reshape(-1),
                              label_smoothing=smoothing, reduction="none").view(S, B)
        up = _data(S, B, seed=18)
        (ref * up).sum().backward()
        local = _chunk(logits, mesh, -1).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, mesh.tp_group, vocab_size=vocab,
                                            padded_vocab_size=padded, label_smoothing=smoothing)
        assert loss.dtype == torch.float32
        assert_close(loss, ref, **TOL)
        (loss * up).sum().backward()
        full_grad = torch.cat([ref_in.grad, torch.zeros(S, B, padded - vocab)], -1)
        assert_close(local.grad, _chunk(full_grad, mesh, -1), **TOL)


def _check_ce_options(mesh: ParallelMesh, padded: int) -> None:
    logits = _data(S, B, padded, seed=16) * 4
    target = torch.randint(0, VOCAB, (S, B), generator=torch.Generator().manual_seed(17))
    # ignore_index: zero loss and zero gradient at ignored tokens, the rest unchanged.
    t = target.clone()
    t[:, 0] = -100
    local = _chunk(logits, mesh, -1).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, t, mesh.tp_group, vocab_size=VOCAB,
                                        padded_vocab_size=padded, ignore_index=-100)
    ref = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), t.reshape(-1),
                          ignore_index=-100, reduction="none").view(S, B)
    assert_close(loss, ref, **TOL)
    loss.sum().backward()
    assert local.grad[:, 0].abs().max() == 0

    # bf16 logits: fp32 math, grads returned in bf16
    local = _chunk(logits, mesh, -1).to(torch.bfloat16).requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, mesh.tp_group, vocab_size=VOCAB,
                                        padded_vocab_size=padded)
    ref = F.cross_entropy(logits[..., :VOCAB].to(torch.bfloat16).float().reshape(-1, VOCAB),
                          target.reshape(-1), reduction="none").view(S, B)
    assert_close(loss, ref, **TOL)
    loss.sum().backward()
    assert local.grad.dtype == torch.bfloat16

    # logits already gathered to the full padded vocab: refuse instead of a wrong loss.
    try:
        vocab_parallel_cross_entropy(logits, target, mesh.tp_group, vocab_size=VOCAB,
                                     padded_vocab_size=padded)
    except ValueError as e:
        assert "already gathered" in str(e), e
    else:
        raise AssertionError("gathered logits were accepted")


def _check_layers(rank: int, world: int, tp: int) -> str:
    torch.manual_seed(0)
    single = ParallelMesh.single()
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=tp))
    for sp in (False, True):
        for gather in ((False, True) if not sp else (False,)):
            _check_column(mesh, single, sp, gather)
        for input_is_parallel in ((True, False) if not sp else (True,)):
            _check_row(mesh, single, sp, input_is_parallel)
        _check_mlp(mesh, single, sp)
        _check_embedding(mesh, single, sp)
    _check_cross_entropy(mesh, single)
    return "ok"


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_layers_match_single_process(tp):
    assert run_distributed(_check_layers, 4, tp) == ["ok"] * 4


def test_padded_vocab_size():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(30522, 128, 2) == 30720
    assert padded_vocab_size(256, 128, 2) == 256
    with pytest.raises(ValueError, match="--make-vocab-size-divisible-by"):
        padded_vocab_size(100, 0, 1)


def test_padded_init_does_not_depend_on_tp():
    """Padded vocab sizes differ per TP; the real rows and the RNG state after init must not."""
    single = ParallelMesh.single()
    weights, after = [], []
    for tp in (1, 2, 8):
        padded = padded_vocab_size(VOCAB, 4, tp)
        torch.manual_seed(0)
        emb = VocabParallelEmbedding(padded, H, single, vocab_size=VOCAB)
        out = ColumnParallelLinear(H, padded, single, init_out_features=VOCAB)
        weights.append((emb.weight[:VOCAB].detach(), out.weight[:VOCAB].detach()))
        after.append(torch.rand(3))
        assert emb.weight[VOCAB:].abs().sum() == 0 and out.weight[VOCAB:].abs().sum() == 0
    for w, a in zip(weights[1:], after[1:]):
        assert torch.equal(w[0], weights[0][0]) and torch.equal(w[1], weights[0][1])
        assert torch.equal(a, after[0])
    with pytest.raises(ValueError, match="true vocabulary size 60"):
        VocabParallelEmbedding(56, H, single, vocab_size=60)


def test_layer_shape_errors():
    mesh = ParallelMesh.single()
    with pytest.raises(ValueError, match="gather_output=True cannot be combined"):
        ColumnParallelLinear(4, 4, _FakeTP2(), gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="input_is_parallel=True"):
        RowParallelLinear(4, 4, _FakeTP2(), input_is_parallel=False, sequence_parallel=True)
    with pytest.raises(ValueError, match="output size 5 is not divisible"):
        ColumnParallelLinear(4, 5, _FakeTP2())
    with pytest.raises(ValueError, match="padded_vocab_size"):
        VocabParallelEmbedding(51, 4, _FakeTP2())
    emb = VocabParallelEmbedding(10, 4, mesh)
    with pytest.raises(TypeError, match="integer"):
        emb(torch.zeros(2, 2))


def test_cross_entropy_argument_errors():
    logits = torch.randn(4, 8)
    target = torch.zeros(4, dtype=torch.long)
    ce = vocab_parallel_cross_entropy
    with pytest.raises(ValueError, match="padded vocabulary is 16"):
        ce(logits, target, None, vocab_size=8, padded_vocab_size=16)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 6\)"):
        ce(logits, torch.full((4,), 7), None, vocab_size=6, padded_vocab_size=8)
    with pytest.raises(ValueError, match="--label-smoothing"):
        ce(logits, target, None, vocab_size=8, padded_vocab_size=8, label_smoothing=1.0)
    with pytest.raises(ValueError, match="target shape"):
        ce(logits, target[:3], None, vocab_size=8, padded_vocab_size=8)
    # single process equals torch, even with large logits
    x = torch.randn(5, 7, 8) * 300
    t = torch.randint(0, 8, (5, 7))
    assert_close(ce(x, t, None, vocab_size=8, padded_vocab_size=8, label_smoothing=0.2),
                 F.cross_entropy(x.transpose(1, 2), t, label_smoothing=0.2, reduction="none"),
                 **TOL)
    xg = x.clone().requires_grad_()
    loss = ce(xg, t, None, vocab_size=8, padded_vocab_size=8).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice"):
        loss.backward()


class _FakeTP2(ParallelMesh):
    """A mesh that claims TP=2 without processes: enough for constructor validation."""

    def __init__(self) -> None:
        super().__init__(ParallelConfig(), torch.device("cpu"), 0, 1,
                         {"pp": None, "dp": None, "tp": None}, None, None)

    tp_size = 2  # type: ignore[assignment]
