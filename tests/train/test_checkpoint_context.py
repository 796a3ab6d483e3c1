"""Checkpoints stay layout-independent under context parallelism (parameters are replicated
over CP): a CP2 x TP2 run's checkpoint loads in one process, and a one-process checkpoint loads
under CP2; every parameter and AdamW state equals the saved one and the next steps give the
saving layout's own losses. Each CP rank keeps its own RNG file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from layout_cases import Layout, layout_mesh, micro_batches, model_config, preload_worker_modules
from megapre.parallel import ParallelMesh
from megapre.parallel.testing import run_distributed
from megapre.train.checkpoint import load_checkpoint, save_checkpoint
from megapre.train.parallel_model import ParallelModel
from megapre.train.state_dict import full_state
from megapre.train.step import StepConfig, TrainStep

MICRO, GLOBAL, RTOL = 2, 8, 1e-5
CFG = dataclasses.replace(model_config(), position_embedding_type="rope")


def _mesh(layout: Layout) -> ParallelMesh:
    return layout_mesh(layout) if layout.world > 1 else ParallelMesh.single(device="cpu")


def _run(layout: Layout, root: str, save: bool) -> tuple[dict, list[float]]:
    """Save after 3 steps (or load into a differently seeded model), then 2 more steps."""
    mesh = _mesh(layout)
    model = ParallelModel.build("gpt", CFG, mesh, seed=5 if save else 99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    step = TrainStep(model, opt, StepConfig(MICRO, GLOBAL))

    def steps(first, n):
        return [step(iter(micro_batches("gpt", it % 3, GLOBAL, MICRO, mesh.dp_rank,
                                        mesh.dp_size))).loss for it in range(first, first + n)]
    if save:
        steps(0, 3)
        save_checkpoint(root, 3, model, opt, mesh, consumed_samples=3 * GLOBAL)
    else:
        assert load_checkpoint(root, model, opt, mesh)["iteration"] == 3
    state = full_state(model.models, opt, mesh, CFG)  # collective over TP
    return state, steps(3, 2)


def _worker(rank, world, layout, root, save):
    return _run(layout, root, save)


def _compare(got, ref, what):
    (state, losses), (ref_state, ref_losses) = got, ref
    assert set(state) == set(ref_state) and any(k.endswith(".exp_avg_sq") for k in state)
    for key, value in ref_state.items():
        assert torch.equal(state[key], value), f"{what}: {key} differs"
    for a, b in zip(losses, ref_losses, strict=True):
        assert abs(a - b) <= RTOL * abs(b), f"{what}: {losses} vs {ref_losses}"


@pytest.mark.slow
def test_context_parallel_checkpoints_load_in_any_layout(tmp_path):
    preload_worker_modules()
    cp2tp2, cp2 = Layout(tp=2, cp=2), Layout(cp=2)
    saved = run_distributed(_worker, 4, cp2tp2, str(tmp_path / "cp"), True, timeout_s=300)
    rng_files = sorted(p.name for p in (tmp_path / "cp").rglob("rank_*.pt"))
    assert len(rng_files) == 4, rng_files  # one per rank: CP ranks do not overwrite each other
    _compare(_run(Layout(), str(tmp_path / "cp"), False), saved[0], "CP2xTP2 -> one process")

    single = _run(Layout(), str(tmp_path / "one"), True)
    loaded = run_distributed(_worker, 2, cp2, str(tmp_path / "one"), False, timeout_s=300)
    for rank, got in enumerate(loaded):
        _compare(got, single, f"one process -> CP2 rank {rank}")
