"""ParallelMesh: Megatron's rank layout, group membership, validation errors, single process."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megapre.parallel import ParallelConfig, ParallelMesh, check_model_split
from megapre.parallel.mesh import data_parallel_size, rank_grid
from megapre.parallel.testing import run_distributed


def _members(group) -> list[int]:
    """Global ranks of `group`, found by all-gathering each member's global rank."""
    size = dist.get_world_size(group)
    out = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
    dist.all_gather(out, torch.tensor([dist.get_rank()]), group=group)
    return [int(t) for t in out]


def _timeout_s(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def _describe_mesh(rank: int, world: int) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=2, pipeline_parallel=2, timeout_s=60))
    info = dict(tp=mesh.tp_rank, dp=mesh.dp_rank, pp=mesh.pp_rank,
                sizes=(mesh.tp_size, mesh.dp_size, mesh.pp_size),
                tp_members=_members(mesh.tp_group), dp_members=_members(mesh.dp_group),
                pp_members=_members(mesh.pp_group),
                tp_ranks=mesh.tp_ranks, dp_ranks=mesh.dp_ranks, pp_ranks=mesh.pp_ranks,
                first=mesh.is_first_stage, last=mesh.is_last_stage,
                emb_ranks=mesh.embedding_ranks,
                emb_members=_members(mesh.embedding_group) if mesh.embedding_group else None,
                coord=tuple(mesh.device_mesh.get_coordinate()),
                dm_tp=_members(mesh.device_mesh["tp"].get_group()),
                dm_dp=_members(mesh.device_mesh.get_group("dp")),
                timeouts=[_timeout_s(g) for g in (mesh.tp_group, mesh.dp_group, mesh.pp_group,
                                                 mesh.embedding_group)])
    return info


@pytest.mark.slow
def test_rank_layout_tp2_pp2_dp2_matches_megatron():
    infos = run_distributed(_describe_mesh, 8)
    for r, info in enumerate(infos):
        tp, dp, pp = r % 2, (r // 2) % 2, r // 4
        assert (info["tp"], info["dp"], info["pp"]) == (tp, dp, pp), (r, info)
        assert info["coord"] == (pp, dp, tp)
        assert info["dm_tp"] == info["tp_members"] and info["dm_dp"] == info["dp_members"]
        assert info["sizes"] == (2, 2, 2)
        expect_tp = [pp * 4 + dp * 2 + t for t in range(2)]
        expect_dp = [pp * 4 + d * 2 + tp for d in range(2)]
        expect_pp = [p * 4 + dp * 2 + tp for p in range(2)]
        assert info["tp_members"] == info["tp_ranks"] == expect_tp
        assert info["dp_members"] == info["dp_ranks"] == expect_dp
        assert info["pp_members"] == info["pp_ranks"] == expect_pp
        assert info["first"] == (pp == 0) and info["last"] == (pp == 1)
        # With two stages every rank is first or last: its embedding group is its pp column.
        assert info["emb_members"] == info["emb_ranks"] == expect_pp
        assert info["timeouts"] == [60.0] * 4  # ParallelConfig.timeout_s reached every group


def _init_like_torchrun(rank: int, world: int) -> tuple:
    assert not dist.is_initialized()
    try:
        ParallelMesh.init(ParallelConfig(tensor_parallel=4, timeout_s=45))
    except ValueError as e:
        bad = str(e)
    else:
        raise AssertionError("TP 4 on 2 processes was accepted")
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=2, timeout_s=45))
    default = dist.distributed_c10d._get_default_group()
    return (bad, dist.get_backend(), _timeout_s(default), mesh.tp_rank, mesh.tp_ranks)


@pytest.mark.slow
def test_init_from_torchrun_environment():
    """ParallelMesh.init starts torch.distributed itself (gloo on CPU) from torchrun's env vars."""
    res = run_distributed(_init_like_torchrun, 2, backend=None)
    for rank, (bad, backend, timeout, tp_rank, tp_ranks) in enumerate(res):
        assert "world size 2 is not divisible by --tensor-model-parallel-size 4" in bad
        assert backend == "gloo" and timeout == 45.0
        assert tp_rank == rank and tp_ranks == [0, 1]


def test_rank_grid_formula():
    grid = rank_grid(16, tensor_parallel=2, pipeline_parallel=4)
    for r in range(16):
        assert grid[r // 4, (r // 2) % 2, 0, r % 2] == r


def test_rank_grid_formula_with_context_parallel():
    """Megatron's order with CP: tp innermost, then cp, then dp, then pp."""
    grid = rank_grid(32, tensor_parallel=2, pipeline_parallel=2, context_parallel=4)
    assert grid.shape == (2, 2, 4, 2)  # (pp, dp, cp, tp)
    for r in range(32):
        assert grid[r // 16, (r // 8) % 2, (r // 2) % 4, r % 2] == r


def test_rank_grid_formula_tp_pp_dp_order():
    """Megatron's --use-tp-pp-dp-mapping: tp innermost, then cp, then pp, then dp."""
    grid = rank_grid(32, tensor_parallel=2, pipeline_parallel=2, context_parallel=2,
                     tp_pp_dp_order=True)
    assert grid.shape == (2, 4, 2, 2)  # (pp, dp, cp, tp)
    for r in range(32):
        assert grid[(r // 4) % 2, r // 8, (r // 2) % 2, r % 2] == r


def test_single_process_mesh_has_unit_sizes():
    mesh = ParallelMesh.init(ParallelConfig())  # no torch.distributed, no torchrun env
    assert not dist.is_initialized()
    assert (mesh.tp_size, mesh.pp_size, mesh.dp_size, mesh.world_size) == (1, 1, 1, 1)
    assert mesh.tp_group is None and mesh.dp_group is None and mesh.pp_group is None
    assert mesh.is_first_stage and mesh.is_last_stage and mesh.in_embedding_group
    assert mesh.tp_ranks == mesh.dp_ranks == mesh.pp_ranks == mesh.embedding_ranks == [0]
    assert not ParallelMesh.single(ParallelConfig(sequence_parallel=True)).sequence_parallel


def test_single_process_refuses_model_parallel_config():
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 2"):
        ParallelMesh.single(ParallelConfig(tensor_parallel=2))


def test_world_size_must_divide():
    with pytest.raises(ValueError, match=r"world size 6 .*--tensor-model-parallel-size 4"):
        data_parallel_size(6, 4, 1)
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size 2 = 8"):
        data_parallel_size(12, 4, 2)
    assert data_parallel_size(16, 2, 2) == 4


def test_config_validation():
    with pytest.raises(ValueError, match="--tensor-model-parallel-size must be a positive"):
        ParallelConfig(tensor_parallel=0)
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size must be a positive"):
        ParallelConfig(pipeline_parallel=1.5)
    with pytest.raises(ValueError, match="2 virtual pipeline stages per rank .*--num-layers-per-virtual-pipeline-stage"):
        ParallelConfig(pipeline_parallel=1, virtual_pipeline=2)
    with pytest.raises(ValueError, match="timeout"):
        ParallelConfig(timeout_s=0)
    ParallelConfig(tensor_parallel=2, pipeline_parallel=2, virtual_pipeline=2)


def test_model_layout_validation():
    ok = dict(num_layers=8, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=64,
              seq_length=16, tp=2, pp=2, virtual=2)
    check_model_split(**ok)
    with pytest.raises(ValueError, match="--num-attention-heads 6 .*--tensor-model-parallel-size 4"):
        check_model_split(**{**ok, "num_attention_heads": 6, "num_query_groups": 6, "tp": 4})
    with pytest.raises(ValueError, match="--num-query-groups 2 .*--tensor-model-parallel-size 4"):
        check_model_split(**{**ok, "num_query_groups": 2, "tp": 4})
    with pytest.raises(ValueError, match="--num-attention-heads 8 .*--num-query-groups 3"):
        check_model_split(**{**ok, "num_query_groups": 3, "tp": 1})
    with pytest.raises(ValueError, match=r"--num-layers 6 .*2 x 2 virtual stages = 4"):
        check_model_split(**{**ok, "num_layers": 6})
    with pytest.raises(ValueError, match="--num-layers 5 .*--pipeline-model-parallel-size 2:"):
        check_model_split(**{**ok, "num_layers": 5, "virtual": None})
