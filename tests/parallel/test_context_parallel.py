"""Context parallelism's pieces: the zig-zag split, and ring attention (forward and backward)
against plain full attention, on one process (a ring of one) and across rings of 2 and 4 gloo
processes. Whole-model equality with one process is in test_context_layouts.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megapre.parallel.context import (ContextGroup, merge_sequence, ring_attention,
                                      split_sequence, zigzag_positions)
from megapre.parallel.testing import run_distributed


def test_zigzag_split_positions_and_merge():
    x = torch.arange(16).view(1, 16)
    assert split_sequence(x, 1, 2, 0).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert split_sequence(x, 1, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert split_sequence(x, 1, 4, 1).tolist() == [[2, 3, 12, 13]]
    for cp in (1, 2, 4):
        parts = [split_sequence(x, 1, cp, r) for r in range(cp)]
        assert torch.equal(merge_sequence(parts, 1), x)
        for r in range(cp):
            assert torch.equal(zigzag_positions(16, cp, r), parts[r][0])
    with pytest.raises(ValueError, match="6 equal chunks"):
        split_sequence(torch.zeros(2, 8), 1, 3, 0)


def _reference(q, k, v, causal, mask):
    """Full attention with k/v heads repeated for grouped-query attention; masked rows -> 0."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = q.shape[2]
    hide = torch.zeros(s, s, dtype=torch.bool)
    if causal:
        hide = torch.ones(s, s, dtype=torch.bool).triu(1)
    if mask is not None:
        hide = hide | mask
    return torch.softmax(scores.masked_fill(hide, -math.inf), -1).nan_to_num(0.0) @ v


def _inputs(seed: int, s: int = 16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, s, 8, generator=g, dtype=dtype)
    k = torch.randn(2, 2, s, 8, generator=g, dtype=dtype)  # grouped-query: 2 k/v heads
    v = torch.randn(2, 2, s, 8, generator=g, dtype=dtype)
    mask = torch.rand(2, 1, s, s, generator=g) < 0.3
    mask[0, 0, 5] = True  # a query that sees no key at all: zeros, never NaN
    dout = torch.randn(2, 4, s, 8, generator=g, dtype=dtype)
    return q, k, v, mask, dout


def _grads(out, dout, tensors):
    return torch.autograd.grad((out * dout).sum(), tensors)


def _ring(q, k, v, ring, causal, mask):
    """ring_attention on [b, heads, s, d] tensors (its layout is [s, b, heads, d])."""
    seq_first = [t.permute(2, 0, 1, 3) for t in (q, k, v)]
    out = ring_attention(*seq_first, ring, scale=1 / math.sqrt(8), causal=causal, mask=mask)
    return out.permute(1, 2, 0, 3)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_ring_of_one_matches_full_attention(causal, masked):
    q, k, v, mask, dout = _inputs(0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    m = mask if masked else None
    out = _ring(q, k, v, ContextGroup.single(), causal, m)
    ref = _reference(q, k, v, causal, m)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(out, dout, (q, k, v)), _grads(ref, dout, (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def _ring_worker(rank: int, world: int) -> dict:
    """Rings of 4 (the world) and of 2 (ranks {0,1} and {2,3}); each rank attends its zig-zag
    share and returns its output and input grads."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rings = {4: ContextGroup(dist.group.WORLD, (0, 1, 2, 3), rank),
             2: ContextGroup(pairs[rank // 2], (rank // 2 * 2, rank // 2 * 2 + 1), rank % 2)}
    out = {}
    for cp, ring in rings.items():
        for causal, masked in ((True, False), (True, True), (False, True)):
            q, k, v, mask, dout = _inputs(1 + cp)
            local = [split_sequence(t, 2, cp, ring.rank).requires_grad_() for t in (q, k, v)]
            m = split_sequence(mask, 2, cp, ring.rank) if masked else None
            o = _ring(*local, ring, causal, m)
            grads = _grads(o, split_sequence(dout, 2, cp, ring.rank), local)
            out[(cp, causal, masked)] = (o.detach(), *grads)
    return out


@pytest.mark.slow
def test_ring_attention_across_ranks_matches_full_attention():
    results = run_distributed(_ring_worker, 4, timeout_s=120)
    for (cp, causal, masked) in results[0]:
        q, k, v, mask, dout = _inputs(1 + cp)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        ref = _reference(q, k, v, causal, mask if masked else None)
        want = (ref.detach(), *_grads(ref, dout, (q, k, v)))
        members = range(4) if cp == 4 else range(2)  # ranks 2, 3 repeat ranks 0, 1's ring
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            got = merge_sequence([results[r][(cp, causal, masked)][i] for r in members], 2)
            torch.testing.assert_close(got, want[i], rtol=1e-11, atol=1e-11,
                                       msg=f"cp{cp} causal={causal} masked={masked} {name}")
        if cp == 2:
            for r in (2, 3):
                assert torch.equal(results[r][(2, causal, masked)][0],
                                   results[r - 2][(2, causal, masked)][0])


@pytest.mark.parametrize("cp", [2, 3, 4, 8])
def test_zigzag_balances_causal_work(cp):
    """Megatron's point of the zig-zag split: under a causal mask every CP rank computes the same
    number of half-blocks over a whole ring (a contiguous split would give rank r about r times
    rank 0's work), and only the two diagonal ones need the triangular mask."""
    from megapre.parallel.context import _blocks

    for rank in range(cp):
        work = [blk for src in range(cp) for blk in _blocks(rank, src, cp, causal=True)]
        assert len(work) == 2 * cp + 1, (rank, work)
        assert sum(diag for *_, diag in work) == 2
    assert all(len(list(_blocks(r, s, cp, causal=False))) == 4
               for r in range(cp) for s in range(cp))


def _describe_cp_mesh(rank: int, world: int) -> dict:
    from megapre.parallel import ParallelConfig, ParallelMesh

    mesh = ParallelMesh.init(ParallelConfig(pipeline_parallel=2, context_parallel=2))
    members = {}
    for name in ("tp", "cp", "dp", "pp", "dp_cp"):
        group = getattr(mesh, f"{name}_group")
        out = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, torch.tensor([rank]), group=group)
        members[name] = [int(t) for t in out]
    return dict(coord=(mesh.pp_rank, mesh.dp_rank, mesh.cp_rank, mesh.tp_rank),
                dm=tuple(mesh.device_mesh.get_coordinate()), members=members,
                ranks={n: getattr(mesh, f"{n}_ranks") for n in ("tp", "cp", "dp", "pp", "dp_cp")},
                emb=mesh.embedding_ranks, sizes=(mesh.dp_size, mesh.dp_cp_size))


@pytest.mark.slow
def test_mesh_with_context_parallel_follows_megatron_order():
    """CP2 x DP2 x PP2 on 8 ranks: cp = r % 2, dp = (r // 2) % 2, pp = r // 4 (TP 1; TP's place
    innermost is in test_parallel_mesh's grid formula); every group holds the ranks its name says,
    and gradients reduce over DP x CP."""
    infos = run_distributed(_describe_cp_mesh, 8, timeout_s=120)
    for r, info in enumerate(infos):
        cp, dp, pp = r % 2, (r // 2) % 2, r // 4
        assert info["coord"] == info["dm"] == (pp, dp, cp, 0)
        expect = {"tp": [r], "cp": [pp * 4 + dp * 2 + c for c in range(2)],
                  "dp": [pp * 4 + d * 2 + cp for d in range(2)],
                  "dp_cp": [pp * 4 + i for i in range(4)],
                  "pp": [p * 4 + dp * 2 + cp for p in range(2)]}
        for name, ranks in expect.items():
            assert info["members"][name] == info["ranks"][name] == ranks, (r, name, info)
        assert info["emb"] == expect["pp"] and info["sizes"] == (2, 4)
