"""Autograd collectives (megapre.parallel.comm): forward and backward of every op against the
single-process math, on gloo subgroups (TP=2 inside a world of 4, and TP=4)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel import comm
from megapre.parallel.testing import run_distributed


def _rank_weight(shape, tp_rank: int) -> torch.Tensor:
    """A per-TP-rank upstream gradient (identical across DP ranks)."""
    g = torch.Generator().manual_seed(100 + tp_rank)
    return torch.randn(shape, generator=g)


def _all_weights(shape, tp: int) -> list[torch.Tensor]:
    return [_rank_weight(shape, r) for r in range(tp)]


def _check_collectives(rank: int, world: int, tp: int) -> str:
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=tp))
    group, r = mesh.tp_group, mesh.tp_rank
    full = torch.randn(8, 3, 4 * tp, generator=torch.Generator().manual_seed(7))

    # copy_to_tp: forward identity, backward sums the ranks' gradients.
    x = full.clone().requires_grad_()
    y = comm.copy_to_tp(x, group)
    assert_close(y, full)
    (y * _rank_weight(y.shape, r)).sum().backward()
    assert_close(x.grad, sum(_all_weights(full.shape, tp)))

    # reduce_from_tp: forward sums the ranks' inputs, backward identity.
    x = (full * (r + 1)).requires_grad_()
    y = comm.reduce_from_tp(x, group)
    assert_close(y, full * sum(range(1, tp + 1)))
    w = _rank_weight(y.shape, r)
    (y * w).sum().backward()
    assert_close(x.grad, w)

    # scatter_to_tp / gather_from_tp on the last dim.
    x = full.clone().requires_grad_()
    y = comm.scatter_to_tp(x, group)
    assert_close(y, full.chunk(tp, -1)[r])
    (y * _rank_weight(y.shape, r)).sum().backward()
    assert_close(x.grad, torch.cat(_all_weights(y.shape, tp), -1))

    x = full.chunk(tp, -1)[r].clone().requires_grad_()
    y = comm.gather_from_tp(x, group)
    assert_close(y, full)
    w = _rank_weight(y.shape, 0)  # the gathered output is replicated: same grad everywhere
    (y * w).sum().backward()
    assert_close(x.grad, w.chunk(tp, -1)[r])

    # sequence dim (0 = Megatron [s, b, h], and an explicit dim 1).
    for dim in (0, 1):
        seq_full = full if dim == 0 else full.transpose(0, 1).contiguous() * 1.0
        seq_full = seq_full[:, :, :4] if dim == 1 else seq_full
        if seq_full.size(dim) % tp:
            continue
        chunk = seq_full.chunk(tp, dim)[r]

        x = seq_full.clone().requires_grad_()
        y = comm.scatter_to_sp(x, group, dim)
        assert_close(y, chunk)
        (y * _rank_weight(y.shape, r)).sum().backward()
        assert_close(x.grad, torch.cat(_all_weights(y.shape, tp), dim))

        # gather with a tensor-parallel consumer: backward reduce-scatters partial grads.
        x = chunk.clone().requires_grad_()
        y = comm.gather_from_sp(x, group, dim)
        assert_close(y, seq_full)
        (y * _rank_weight(y.shape, r)).sum().backward()
        assert_close(x.grad, sum(_all_weights(y.shape, tp)).chunk(tp, dim)[r])

        # gather with a replicated consumer: backward keeps this rank's chunk.
        x = chunk.clone().requires_grad_()
        y = comm.gather_from_sp(x, group, dim, grad_is_partial=False)
        w = _rank_weight(y.shape, 0)
        (y * w).sum().backward()
        assert_close(x.grad, w.chunk(tp, dim)[r])

        # reduce-scatter: forward sums partial results and keeps a chunk, backward all-gathers.
        x = (seq_full * (r + 1)).requires_grad_()
        y = comm.reduce_scatter_to_sp(x, group, dim)
        assert_close(y, (seq_full * sum(range(1, tp + 1))).chunk(tp, dim)[r])
        (y * _rank_weight(y.shape, r)).sum().backward()
        assert_close(x.grad, torch.cat(_all_weights(y.shape, tp), dim))

    # a sequence length that does not divide gives an error naming the flag.
    odd = torch.randn(tp + 1, 2, 4)
    for fn in (comm.scatter_to_sp, comm.reduce_scatter_to_sp):
        try:
            fn(odd, group)
        except ValueError as e:
            assert "--seq-length" in str(e) and "--tensor-model-parallel-size" in str(e), e
        else:
            raise AssertionError(f"{fn.__name__} accepted a sequence of length {tp + 1}")

    # all_reduce_grads sums grads over TP (mixed dtypes keep their dtype).
    p32 = torch.nn.Parameter(torch.zeros(3))
    p64 = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p32.grad = torch.full((3,), float(r + 1))
    p64.grad = torch.full((2,), float(r + 1), dtype=torch.float64)
    comm.all_reduce_grads([p32, p64], group)
    total = float(sum(range(1, tp + 1)))
    assert_close(p32.grad, torch.full((3,), total))
    assert_close(p64.grad, torch.full((2,), total, dtype=torch.float64))
    return f"ok tp={mesh.tp_rank} dp={mesh.dp_rank}"


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_collectives_match_single_process_math(tp):
    results = run_distributed(_check_collectives, 4, tp)
    assert all(r.startswith("ok") for r in results)


def test_collectives_are_identity_without_groups():
    x = torch.randn(4, 2, 6, requires_grad=True)
    for fn in (comm.copy_to_tp, comm.reduce_from_tp, comm.scatter_to_tp, comm.gather_from_tp,
               comm.scatter_to_sp, comm.gather_from_sp, comm.reduce_scatter_to_sp):
        assert fn(x, None) is x
    assert comm.group_size(None) == 1 and comm.group_rank(None) == 0
