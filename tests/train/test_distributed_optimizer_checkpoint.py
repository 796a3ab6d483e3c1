"""Checkpoints of the distributed optimizer are the non-distributed optimizer's: saved under DP2
with --use-distributed-optimizer they load in one process with torch's AdamW, and the reverse
(into DP2 with overlapped communication); every parameter and AdamW state equals the saved one
and the next steps give the losses of an uninterrupted single-process run (1e-5 relative).
Saved with --num-distributed-optimizer-instances 2 on DP4 the checkpoint is the same: it resumes
in one process (torch's AdamW) and under DP2 with one instance, and a plain checkpoint resumes
into DP4 with two instances.
"""
from __future__ import annotations

import pytest
import torch

from layout_cases import micro_batches, model_config, preload_worker_modules
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel.testing import run_distributed
from megapre.train.checkpoint import load_checkpoint, save_checkpoint
from megapre.train.optim import ShardingArgs, build_optimizer
from megapre.train.parallel_model import ParallelModel
from megapre.train.state_dict import full_state
from megapre.train.step import StepConfig, TrainStep

MICRO, GLOBAL, FIRST, THEN = 2, 8, 3, 2
RTOL = 1e-5
KIND = "gpt"
SHARDED = ShardingArgs(use_distributed_optimizer=True, overlap_grad_reduce=True,
                       overlap_param_gather=True, ddp_bucket_size=3000)


def _run(mesh: ParallelMesh, sharding: ShardingArgs, load: str | None, save: str | None,
         first: int, steps: int) -> dict:
    model = ParallelModel.build(KIND, model_config(), mesh, seed=5,
                                ddp=not sharding.use_distributed_optimizer)
    opt = build_optimizer(model, 1e-3, 0.01, sharding=sharding)
    step = TrainStep(model, opt, StepConfig(MICRO, GLOBAL))
    loaded = None
    if load:
        load_checkpoint(load, model, opt, mesh, load_rng=False)
        loaded = full_state(model.models, opt, mesh, model.adapter.cfg)
    losses = [step(iter(micro_batches(KIND, it % 3, GLOBAL, MICRO, mesh.dp_rank,
                                      mesh.dp_size))).loss for it in range(first, first + steps)]
    saved = None
    if save:
        save_checkpoint(save, first + steps, model, opt, mesh)
        saved = full_state(model.models, opt, mesh, model.adapter.cfg)
    return {"losses": losses, "saved": saved, "loaded": loaded}


def worker(rank: int, world: int, load: str | None, save: str | None, first: int,
           steps: int, instances: int = 1) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(optimizer_instances=instances),
                             device="cpu")  # DP = world
    return _run(mesh, SHARDED, load, save, first, steps)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The uninterrupted single-process run, and its checkpoint after FIRST steps."""
    preload_worker_modules()
    path = str(tmp_path_factory.mktemp("single"))
    mesh = ParallelMesh.single(device="cpu")
    head = _run(mesh, ShardingArgs(), None, path, 0, FIRST)
    tail = _run(mesh, ShardingArgs(), path, None, FIRST, THEN)
    return {"losses": head["losses"] + tail["losses"], "path": path, "saved": head["saved"]}


def _same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want) and any(k.startswith("optim.") for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-9, msg=key)


def _close(got: list[float], want: list[float]) -> None:
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= RTOL * abs(b), (got, want)


@pytest.mark.slow
def test_distributed_save_loads_without_it(single, tmp_path):
    path = str(tmp_path)
    ranks = run_distributed(worker, 2, None, path, 0, FIRST, timeout_s=240)
    _close(ranks[0]["losses"], single["losses"][:FIRST])
    _same_state(ranks[0]["saved"], ranks[1]["saved"])
    resumed = _run(ParallelMesh.single(device="cpu"), ShardingArgs(), path, None, FIRST, THEN)
    _same_state(resumed["loaded"], ranks[0]["saved"])
    _close(resumed["losses"], single["losses"][FIRST:])


@pytest.mark.slow
def test_plain_save_loads_into_distributed(single):
    ranks = run_distributed(worker, 2, single["path"], None, FIRST, THEN, timeout_s=240)
    for r in ranks:
        _same_state(r["loaded"], single["saved"])
        _close(r["losses"], single["losses"][FIRST:])


@pytest.mark.slow
def test_two_instance_save_resumes_elsewhere(single, tmp_path):
    """DP4 with two optimizer instances saves the non-distributed layout (each instance's
    shards assembled within it, the same on every rank); it resumes with one instance in one
    process and in DP2 with the next losses of the uninterrupted run, and the plain checkpoint
    resumes into two instances."""
    path = str(tmp_path)
    ranks = run_distributed(worker, 4, None, path, 0, FIRST, 2, timeout_s=300)
    _close(ranks[0]["losses"], single["losses"][:FIRST])
    for r in ranks[1:]:  # every instance saves the same whole state
        _same_state(r["saved"], ranks[0]["saved"])
    resumed = _run(ParallelMesh.single(device="cpu"), ShardingArgs(), path, None, FIRST, THEN)
    _same_state(resumed["loaded"], ranks[0]["saved"])
    _close(resumed["losses"], single["losses"][FIRST:])
    for r in run_distributed(worker, 2, path, None, FIRST, THEN, timeout_s=240):
        _same_state(r["loaded"], ranks[0]["saved"])
        _close(r["losses"], single["losses"][FIRST:])
    for r in run_distributed(worker, 4, single["path"], None, FIRST, THEN, 2, timeout_s=300):
        _same_state(r["loaded"], single["saved"])
        _close(r["losses"], single["losses"][FIRST:])
