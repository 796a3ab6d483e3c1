"""Model-parallel RNG: dropout masks are reproducible, differ across TP ranks only inside the
tracker's region, differ across pipeline stages, and recomputation replays them exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megapre.parallel import (MODEL_PARALLEL_RNG, ColumnParallelLinear, ParallelConfig,
                              ParallelMesh, RNGTracker, RowParallelLinear, recompute,
                              set_random_seed)
from megapre.parallel.random import PP_SEED_STRIDE, TP_SEED_OFFSET, tensor_parallel_seed
from megapre.parallel.testing import run_distributed


def _masks(tracker: RNGTracker, device: str = "cpu") -> dict[str, torch.Tensor]:
    ones = torch.ones(64, device=device)
    outside = F.dropout(ones, 0.5) > 0
    with tracker.fork():
        inside = F.dropout(ones, 0.5) > 0
    after = F.dropout(ones, 0.5) > 0
    return {"outside": outside.cpu(), "inside": inside.cpu(), "after": after.cpu()}


def _tp_mlp_grads(mesh: ParallelMesh, use_recompute: bool) -> list[torch.Tensor]:
    """Column -> dropout (TP stream) -> Row -> dropout (default stream), sequence parallel."""
    tracker = set_random_seed(99, mesh)
    col = ColumnParallelLinear(8, 16, mesh, sequence_parallel=True)
    row = RowParallelLinear(16, 8, mesh, sequence_parallel=True)

    def mlp(x):
        h = col(x)
        with tracker.fork():
            h = F.dropout(h, 0.5)
        return F.dropout(row(h), 0.5)

    x = torch.randn(4, 2, 8, requires_grad=True)  # this rank's sequence chunk
    y = recompute(mlp, x, tracker=tracker) if use_recompute else mlp(x)
    y.square().sum().backward()
    return [y.detach(), x.grad, col.weight.grad, row.weight.grad, row.bias.grad]


def _rank_masks(rank: int, world: int) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=2, pipeline_parallel=2))
    tracker = set_random_seed(1234, mesh)
    masks = _masks(tracker)
    # recomputation re-runs the collectives and replays both streams: bit-identical grads
    plain, rec = _tp_mlp_grads(mesh, False), _tp_mlp_grads(mesh, True)
    assert all(torch.equal(a, b) for a, b in zip(plain, rec)), "recompute changed TP grads"
    return dict(tp=mesh.tp_rank, pp=mesh.pp_rank, **masks)


@pytest.mark.slow
def test_masks_differ_across_tp_only_inside_tracker():
    res = run_distributed(_rank_masks, 4)  # TP2 x PP2
    by = {(r["pp"], r["tp"]): r for r in res}
    for pp in (0, 1):
        a, b = by[(pp, 0)], by[(pp, 1)]
        assert torch.equal(a["outside"], b["outside"]) and torch.equal(a["after"], b["after"])
        assert not torch.equal(a["inside"], b["inside"])
    assert not torch.equal(by[(0, 0)]["outside"], by[(1, 0)]["outside"])  # per-stage seeds
    assert not torch.equal(by[(0, 0)]["inside"], by[(1, 0)]["inside"])


def test_seeds_follow_megatron_offsets():
    mesh = ParallelMesh.single()
    assert tensor_parallel_seed(1234, mesh) == 1234 + TP_SEED_OFFSET
    assert (TP_SEED_OFFSET, PP_SEED_STRIDE) == (2718, 100)


def test_masks_reproducible_and_fork_leaves_default_stream_alone():
    mesh = ParallelMesh.single()
    first = _masks(set_random_seed(7, mesh))
    second = _masks(set_random_seed(7, mesh))
    for k in first:
        assert torch.equal(first[k], second[k]), k
    # the forked draw does not advance the default generator
    torch.manual_seed(7)
    a = F.dropout(torch.ones(64), 0.5) > 0
    b = F.dropout(torch.ones(64), 0.5) > 0
    assert torch.equal(a, first["outside"]) and torch.equal(b, first["after"])
    # the tracker stream continues where it stopped
    tracker = set_random_seed(7, mesh)
    with tracker.fork():
        one = torch.rand(8)
    with tracker.fork():
        two = torch.rand(8)
    g = torch.Generator().manual_seed(7 + TP_SEED_OFFSET)
    assert torch.equal(torch.cat([one, two]), torch.rand(16, generator=g))


def test_tracker_errors():
    tracker = RNGTracker()
    with pytest.raises(KeyError, match="set_random_seed"):
        with tracker.fork():
            pass
    tracker.add(MODEL_PARALLEL_RNG, 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add(MODEL_PARALLEL_RNG, 2)
    with pytest.raises(ValueError, match="--seed"):
        set_random_seed(-1, ParallelMesh.single())


def _block(x: torch.Tensor, w: torch.Tensor, tracker: RNGTracker) -> torch.Tensor:
    """Dropout outside and inside the tracker region, around a matmul."""
    h = F.dropout(x @ w, 0.3)
    with tracker.fork():
        h = F.dropout(torch.tanh(h), 0.3)
    return F.dropout(h @ w.t(), 0.3)


def _run(mode: str, device: str = "cpu"):
    mesh = ParallelMesh.single(device=device)
    tracker = set_random_seed(3, mesh)
    w = torch.randn(16, 16, device=device, requires_grad=True)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    if mode == "plain":
        y = _block(x, w, tracker)
    else:
        y = recompute(_block, x, w, tracker, tracker=tracker if mode == "recompute" else None)
    y.square().sum().backward()
    with tracker.fork():
        tracker_next = torch.rand(4, device=device)
    return y.detach(), x.grad, w.grad, torch.rand(4, device=device), tracker_next


def test_recompute_replays_dropout_masks():
    plain, rec = _run("plain"), _run("recompute")
    for a, b in zip(plain, rec):
        assert torch.equal(a, b)  # bit-identical: outputs, grads, and the RNG streams after


def test_recompute_without_tracker_replay_differs():
    """Guards the test above: not restoring the tracker stream changes the recomputed masks."""
    plain, rec = _run("plain"), _run("no-tracker")
    assert torch.equal(plain[0], rec[0])  # forward is the same...
    assert not torch.equal(plain[2], rec[2])  # ...but backward used different masks


@pytest.mark.cuda
def test_recompute_replays_dropout_masks_cuda():
    plain, rec = _run("plain", "cuda"), _run("recompute", "cuda")
    for a, b in zip(plain, rec):
        assert torch.equal(a, b)
    tracker = set_random_seed(5, ParallelMesh.single(device="cuda"))
    first = _masks(tracker, "cuda")
    second = _masks(set_random_seed(5, ParallelMesh.single(device="cuda")), "cuda")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["inside"], first["outside"])
    assert_close(first["outside"].float().mean(), torch.tensor(0.5), atol=0.2, rtol=0)
