"""Checkpoints across layouts and across processes (gloo on CPU, tiny GPT and BERT).

(a) Reshard: save under TP2 PP2 DP2, load under TP1 PP1 DP1, TP2 PP1 DP2 and PP2 with two
    virtual stages per rank (interleaved 1F1B): every parameter and AdamW state (gathered to
    full tensors) equals the saved one, and two more steps give the losses of the saving
    layout's own continuation.
(b) Exact resume: 20 steps in one run == 10 steps + save + fresh processes + load + 10 steps, bit
    for bit, under TP2 PP2 DP2 with sequence parallelism and dropout on (per-TP-rank tracker
    streams) and data order drawn from numpy/`random` (so every random stream must come back).
    The save is asynchronous (DTensor shards staged to CPU): written while training goes on.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from layout_cases import Layout, micro_batches, model_config, preload_worker_modules
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel.random import set_random_seed
from megapre.parallel.testing import run_distributed
from megapre.train.checkpoint import load_checkpoint, save_checkpoint, wait_for_pending_save
from megapre.train.parallel_model import ParallelModel
from megapre.train.state_dict import full_state
from megapre.train.step import StepConfig, TrainStep

KINDS = ("gpt", "bert")
MICRO, GLOBAL = 2, 8
RTOL = 1e-5
SAVE_LAYOUT = Layout(tp=2, pp=2, dp=2)
LOAD_LAYOUTS = [Layout(), Layout(tp=2, dp=2), Layout(pp=2, vp=2)]  # vp: 2 chunks per rank


def _mesh(layout: Layout) -> ParallelMesh:
    return ParallelMesh.init(ParallelConfig(tensor_parallel=layout.tp,
                                            pipeline_parallel=layout.pp,
                                            virtual_pipeline=layout.vp,
                                            sequence_parallel=layout.sp), device="cpu")


def _build(kind: str, mesh: ParallelMesh, seed: int, cfg=None, tracker=None):
    model = ParallelModel.build(kind, cfg or model_config(), mesh, seed=seed, tracker=tracker)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    return model, opt, TrainStep(model, opt, StepConfig(MICRO, GLOBAL))


def _steps(kind: str, step: TrainStep, mesh: ParallelMesh, first: int, n: int) -> list[float]:
    return [step(iter(micro_batches(kind, it % 3, GLOBAL, MICRO, mesh.dp_rank,
                                    mesh.dp_size))).loss for it in range(first, first + n)]


def _full(model, opt, mesh) -> dict[str, torch.Tensor]:
    if mesh.dp_rank or mesh.tp_rank:
        full_state(model.models, opt, mesh, model.adapter.cfg)  # collective over TP
        return {}
    return full_state(model.models, opt, mesh, model.adapter.cfg)


def save_worker(rank, world, layout, root):
    mesh = _mesh(layout)
    out = {}
    for kind in KINDS:
        model, opt, step = _build(kind, mesh, seed=5)
        _steps(kind, step, mesh, 0, 3)
        save_checkpoint(f"{root}/{kind}", 3, model, opt, mesh, consumed_samples=3 * GLOBAL)
        out[kind] = (_full(model, opt, mesh), _steps(kind, step, mesh, 3, 2))
    return out


def load_worker(rank, world, layout, root):
    mesh = _mesh(layout) if world > 1 else ParallelMesh.single(device="cpu")
    out = {}
    for kind in KINDS:
        model, opt, step = _build(kind, mesh, seed=99)  # different init: all must come from disk
        info = load_checkpoint(f"{root}/{kind}", model, opt, mesh)
        assert info["iteration"] == 3 and info["consumed_samples"] == 3 * GLOBAL, info
        out[kind] = (_full(model, opt, mesh), _steps(kind, step, mesh, 3, 2))
    return out


def _merge(results) -> dict[str, tuple[dict, list[float]]]:
    merged = {}
    for kind in KINDS:
        state = {}
        for per_rank in results:
            state.update(per_rank[kind][0])
        merged[kind] = (state, results[0][kind][1])
    return merged


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    preload_worker_modules()
    root = tmp_path_factory.mktemp("reshard")
    results = run_distributed(save_worker, SAVE_LAYOUT.world, SAVE_LAYOUT, str(root),
                              timeout_s=300)
    return root, _merge(results)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LOAD_LAYOUTS, ids=str)
def test_load_under_another_layout(layout, saved):
    root, ref = saved
    got = _merge(run_distributed(load_worker, layout.world, layout, str(root), timeout_s=300))
    for kind in KINDS:
        ref_state, ref_losses = ref[kind]
        state, losses = got[kind]
        assert set(state) == set(ref_state), sorted(set(state) ^ set(ref_state))
        assert any(k.endswith(".exp_avg_sq") for k in state)
        for key, value in ref_state.items():
            assert torch.equal(state[key], value), f"{kind} {layout}: {key} differs"
        assert len(losses) == len(ref_losses), f"{kind} {layout}: {len(losses)} vs {len(ref_losses)} losses"
        for i, (a, b) in enumerate(zip(losses, ref_losses)):
            assert abs(a - b) <= RTOL * abs(b), f"{kind} {layout} step {3 + i}: {a} vs {b}"


# -- (b) exact resume ----------------------------------------------------------------------------
RESUME_LAYOUT = Layout(tp=2, pp=2, dp=2, sp=True)
SEED = 7


def _dropout_run(kind: str, mesh: ParallelMesh):
    cfg = dataclasses.replace(model_config(), hidden_dropout=0.2, attention_dropout=0.2)
    tracker = set_random_seed(SEED, mesh)
    np.random.seed(SEED)
    random.seed(SEED)
    model, opt, step = _build(kind, mesh, seed=SEED, cfg=cfg, tracker=tracker)
    return model, opt, step


def _random_steps(kind, step, mesh, n) -> list[float]:
    """Steps whose data are drawn from numpy and `random` (the same on every rank)."""
    losses = []
    for _ in range(n):
        batch = int(np.random.randint(0, 50)) + random.randrange(50)
        losses.append(step(iter(micro_batches(kind, batch, GLOBAL, MICRO, mesh.dp_rank,
                                              mesh.dp_size))).loss)
    return losses


def resume_first_worker(rank, world, layout, root):
    """The uninterrupted 20 steps, then the same run again with a save after step 10."""
    mesh = _mesh(layout)
    out = {}
    for kind in KINDS:
        _, _, step = _dropout_run(kind, mesh)
        straight = _random_steps(kind, step, mesh, 20)
        model, opt, step = _dropout_run(kind, mesh)
        first = _random_steps(kind, step, mesh, 10)
        save_checkpoint(f"{root}/{kind}", 10, model, opt, mesh, consumed_samples=10 * GLOBAL,
                        async_save=True)  # written while the next steps run
        out[kind] = (straight, first + _random_steps(kind, step, mesh, 10))
    wait_for_pending_save(barrier=True)
    return out


def resume_second_worker(rank, world, layout, root):
    mesh = _mesh(layout)
    out = {}
    for kind in KINDS:
        cfg = dataclasses.replace(model_config(), hidden_dropout=0.2, attention_dropout=0.2)
        tracker = set_random_seed(SEED + 1, mesh)  # wrong on purpose: the checkpoint restores it
        model, opt, step = _build(kind, mesh, seed=SEED + 1, cfg=cfg, tracker=tracker)
        info = load_checkpoint(f"{root}/{kind}", model, opt, mesh)
        assert info["iteration"] == 10
        out[kind] = _random_steps(kind, step, mesh, 10)
    return out


@pytest.mark.slow
def test_exact_resume_in_new_processes(tmp_path):
    preload_worker_modules()
    w = RESUME_LAYOUT.world
    first = run_distributed(resume_first_worker, w, RESUME_LAYOUT, str(tmp_path), timeout_s=300)
    second = run_distributed(resume_second_worker, w, RESUME_LAYOUT, str(tmp_path), timeout_s=300)
    for kind in KINDS:
        straight, with_save = first[0][kind]
        assert with_save == straight, f"{kind}: saving perturbed the run"
        assert len(set(straight)) > 15, f"{kind}: losses do not vary: {straight}"
        for rank in range(w):
            assert second[rank][kind] == straight[10:], (
                f"{kind} rank {rank}: resumed {second[rank][kind]} vs {straight[10:]}")
