"""--post-layernorm (the original BERT's block: a norm after each residual add and after the
embeddings, none at the end) with --erf-gelu trains identically, BERT and GPT, in TP2 with
sequence parallelism (the embedding norm sees its rank's tokens: its grads are summed over TP),
in PP2 (the embedding norm on the first stage, no final norm on the last) and in DP2, as in
one process; a checkpoint saved in one process resumes in TP2 + SP and in PP2 with the same
losses."""
from __future__ import annotations

import pytest

from layout_cases import Layout, layout_mesh, model_config, preload_worker_modules
from layout_cases import assert_same_runs, resume_losses, train
from megapre.parallel import ParallelMesh
from megapre.parallel.testing import run_distributed
from megapre.train.parallel_model import ParallelModel

STEPS, MICRO, GLOBAL, LR = 3, 2, 4, 0.05  # a large lr: a wrong norm grad shows in the loss
KINDS = ("bert", "gpt")


def _config():
    cfg = model_config()
    cfg.post_layernorm, cfg.activation = True, "gelu_erf"
    return cfg


def _runs(mesh: ParallelMesh) -> dict[str, list[tuple[float, float]]]:
    return {k: train(k, mesh, STEPS, MICRO, GLOBAL, cfg=_config(), lr=LR) for k in KINDS}


def _worker(rank: int, world: int, layout: Layout) -> dict[str, list[tuple[float, float]]]:
    return _runs(layout_mesh(layout))


def test_post_layernorm_model_has_embedding_norm_and_no_final_norm():
    names = set(dict(ParallelModel.build("bert", _config(), ParallelMesh.single(device="cpu"),
                                         seed=5).models[0].named_parameters()))
    assert "embedding.norm.weight" in names and "encoder.layers.0.norm1.bias" in names
    assert not [n for n in names if n.startswith("final_norm")]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [Layout(tp=2, sp=True), Layout(pp=2), Layout(dp=2)], ids=str)
def test_post_layernorm_matches_single_process(layout):
    preload_worker_modules()
    ref = _runs(ParallelMesh.single(device="cpu"))
    for got in run_distributed(_worker, layout.world, layout, timeout_s=240):
        for kind in KINDS:
            assert_same_runs(got[kind], ref[kind], kind)


def _resume_steps(mesh: ParallelMesh, root: str, seed: int, save: bool) -> dict[str, list[float]]:
    return {k: resume_losses(k, _config(), mesh, root, seed, save, MICRO, GLOBAL) for k in KINDS}


def _resume_worker(rank: int, world: int, layout: Layout, root: str) -> dict[str, list[float]]:
    return _resume_steps(layout_mesh(layout), root, seed=99, save=False)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [Layout(tp=2, sp=True), Layout(pp=2)], ids=str)
def test_post_layernorm_checkpoint_resumes_in_another_layout(layout, tmp_path):
    preload_worker_modules()
    ref = _resume_steps(ParallelMesh.single(device="cpu"), str(tmp_path), seed=5, save=True)
    for got in run_distributed(_resume_worker, layout.world, layout, str(tmp_path),
                               timeout_s=240):
        for kind in KINDS:
            assert got[kind] == pytest.approx(ref[kind], rel=1e-5), kind
