"""Context parallelism keeps the layout contract: a model trained with the sequence split over CP
ranks (zig-zag, ring attention), alone and with TP (+ sequence parallel), PP and DP, gives the
single process's losses and global grad norms to 1e-5 relative for 10 AdamW steps, then the same
forward-only evaluation loss. Three models: GPT with learned positions and multi-head attention,
GPT with RoPE, grouped-query attention and SwiGLU (true positions reach the rotation), and BERT
(bidirectional ring with a padding mask, [CLS] broadcast to the sentence-order head)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from layout_cases import Layout, layout_mesh, model_config, preload_worker_modules, train
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
LAYOUTS = [
    Layout(cp=2),
    Layout(tp=2, cp=2, sp=True),
    Layout(pp=2, cp=2),
    Layout(dp=2, cp=2),
]


def _worker(rank: int, world: int, layout: Layout) -> dict[str, list[tuple[float, float]]]:
    mesh = layout_mesh(layout)
    return {name: train(kind, mesh, STEPS, MICRO, GLOBAL, layout.schedule, cfg=cfg)
            for name, (kind, cfg) in MODELS.items()}


@pytest.fixture(scope="module")
def reference():
    preload_worker_modules()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mesh = ParallelMesh.single(device="cpu")
        return {name: train(kind, mesh, STEPS, MICRO, GLOBAL, cfg=cfg)
                for name, (kind, cfg) in MODELS.items()}
    finally:
        torch.set_num_threads(threads)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_context_parallel_matches_single_process(layout, reference):
    results = run_distributed(_worker, layout.world, layout, timeout_s=300)
    for rank, per_model in enumerate(results):
        for name, ref in reference.items():
            got = per_model[name]
            assert len(got) == len(ref) == STEPS + 1
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref)):
                where = f"{name} {layout} rank {rank} step {step}"
                assert _rel(loss, ref_loss) <= RTOL, f"{where}: loss {loss} vs {ref_loss}"
                assert _rel(norm, ref_norm) <= RTOL, f"{where}: grad norm {norm} vs {ref_norm}"
