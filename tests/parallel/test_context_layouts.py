"""Context parallelism keeps the layout contract: a model trained with the sequence split over CP
ranks (zig-zag, ring attention), alone and with TP (+ sequence parallel), PP and DP, gives the
single process's losses and global grad norms to 1e-5 relative for 10 AdamW steps, then the same
forward-only evaluation loss. Three models: GPT with learned positions and multi-head attention,
GPT with RoPE, grouped-query attention and SwiGLU (true positions reach the rotation), and BERT
(bidirectional ring with a padding mask, [CLS] broadcast to the sentence-order head)."""
from __future__ import annotations

import dataclasses

import pytest

from layout_cases import (Layout, layout_mesh, model_config, one_thread, preload_worker_modules,
                          train)
from megapre.parallel import ParallelMesh
from megapre.parallel.testing import run_distributed

STEPS, MICRO, GLOBAL = 10, 2, 8
RTOL = 1e-5
MODELS = {
    "gpt-learned": ("gpt", model_config()),
    "gpt-rope-gqa": ("gpt", dataclasses.replace(model_config(), position_embedding_type="rope",
                                                num_query_groups=2, activation="swiglu",
                                                ffn_hidden_size=64)),
    "bert": ("bert", model_config()),
}
# (layout, the models it trains): every model where the ring meets TP and SP, two elsewhere
LAYOUTS = [
    (Layout(cp=2), tuple(MODELS)),
    (Layout(tp=2, cp=2, sp=True), tuple(MODELS)),
    (Layout(pp=2, cp=2), ("gpt-learned", "bert")),
    (Layout(dp=2, cp=2), ("gpt-rope-gqa", "bert")),
]


def _worker(rank: int, world: int, layout: Layout, names: tuple[str, ...]
            ) -> dict[str, list[tuple[float, float]]]:
    mesh = layout_mesh(layout)
    return {name: train(MODELS[name][0], mesh, STEPS, MICRO, GLOBAL, layout.schedule,
                        cfg=MODELS[name][1]) for name in names}


@pytest.fixture(scope="module")
def reference():
    preload_worker_modules()
    with one_thread():
        mesh = ParallelMesh.single(device="cpu")
        return {name: train(kind, mesh, STEPS, MICRO, GLOBAL, cfg=cfg)
                for name, (kind, cfg) in MODELS.items()}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("layout, names", LAYOUTS, ids=[str(lay) for lay, _ in LAYOUTS])
def test_context_parallel_matches_single_process(layout, names, reference):
    results = run_distributed(_worker, layout.world, layout, names, timeout_s=300)
    for rank, per_model in enumerate(results):
        assert set(per_model) == set(names)
        for name in names:
            got, ref = per_model[name], reference[name]
            assert len(got) == len(ref) == STEPS + 1
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref)):
                where = f"{name} {layout} rank {rank} step {step}"
                assert _rel(loss, ref_loss) <= RTOL, f"{where}: loss {loss} vs {ref_loss}"
                assert _rel(norm, ref_norm) <= RTOL, f"{where}: grad norm {norm} vs {ref_norm}"
