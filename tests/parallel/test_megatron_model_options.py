"""The model options Megatron users bring (--qk-layernorm, --squared-relu, --rotary-interleaved,
--apply-layernorm-1p, grouped-query attention) train identically in TP2 with sequence
parallelism (the query/key norm weights see only their rank's heads: their grads are summed
over TP) and in PP2, as in one process."""
from __future__ import annotations

import pytest

from layout_cases import Layout, layout_mesh, model_config, preload_worker_modules, train
from megapre.parallel import ParallelMesh
from megapre.parallel.testing import run_distributed

STEPS, MICRO, GLOBAL, LR = 4, 2, 4, 0.05  # a large lr: a wrong norm grad shows in the loss


def _config():
    cfg = model_config()
    for name, value in dict(position_embedding_type="rope", rotary_interleaved=True,
                            qk_layernorm=True, activation="squared_relu", num_query_groups=2,
                            layernorm_zero_centered_gamma=True).items():
        setattr(cfg, name, value)
    return cfg


def _worker(rank: int, world: int, layout: Layout) -> list[tuple[float, float]]:
    return train("gpt", layout_mesh(layout), STEPS, MICRO, GLOBAL, cfg=_config(), lr=LR)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [Layout(tp=2, sp=True), Layout(pp=2)], ids=str)
def test_megatron_model_options_match_single_process(layout):
    preload_worker_modules()
    ref = train("gpt", ParallelMesh.single(device="cpu"), STEPS, MICRO, GLOBAL, cfg=_config(),
                lr=LR)
    for got in run_distributed(_worker, layout.world, layout, timeout_s=240):
        assert len(got) == len(ref)
        for (loss, norm), (rl, rn) in zip(got, ref):
            assert loss == pytest.approx(rl, rel=1e-5)
            assert norm == pytest.approx(rn, rel=1e-5, abs=1e-12)


def _order_worker(rank: int, world: int) -> tuple[list[tuple[float, float]], tuple[int, int]]:
    from megapre.parallel import ParallelConfig

    mesh = ParallelMesh.init(ParallelConfig(pipeline_parallel=2, tp_pp_dp_order=True),
                             device="cpu")
    return train("gpt", mesh, STEPS, MICRO, 2 * GLOBAL, lr=LR), (mesh.pp_rank, mesh.dp_rank)


@pytest.mark.slow
def test_tp_pp_dp_rank_order_matches_single_process():
    """--use-tp-pp-dp-mapping, PP2 x DP2: ranks 0,1 are the stages of replica 0 and 2,3 of
    replica 1; training equals one process."""
    preload_worker_modules()
    ref = train("gpt", ParallelMesh.single(device="cpu"), STEPS, MICRO, 2 * GLOBAL, lr=LR)
    results = run_distributed(_order_worker, 4, timeout_s=240)
    assert [coords for _, coords in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for got, _ in results:
        for (loss, norm), (rl, rn) in zip(got, ref):
            assert loss == pytest.approx(rl, rel=1e-5)
            assert norm == pytest.approx(rn, rel=1e-5, abs=1e-12)
