"""Fine-tuning in every layout equals one process: losses and grad norms of 10 AdamW steps of a
GPT (last-token head) and a BERT (pooled [CLS] head) classifier on variable-length batches, then
a forward-only loss, agree with the single-process run within 1e-5 relative on every rank.
Batches are padded to their longest sample (to --seq-length under pipeline parallelism)."""
from __future__ import annotations

import pytest

from layout_cases import Layout, one_thread, preload_worker_modules
from megapre.parallel import ParallelMesh
from megapre.parallel.testing import run_distributed

from task_cases import layout_worker, train

STEPS, MICRO, GLOBAL = 10, 2, 8
KINDS = ("gpt", "bert")
LAYOUTS = [Layout(tp=2), Layout(pp=2), Layout(dp=2), Layout(tp=2, pp=2),
           Layout(tp=2, dp=2, sp=True)]


@pytest.fixture(scope="module")
def reference():
    preload_worker_modules()
    with one_thread():
        return {k: train(k, ParallelMesh.single(device="cpu"), STEPS, MICRO, GLOBAL)
                for k in KINDS}


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_finetune_layout_matches_single_process(layout, reference):
    results = run_distributed(layout_worker, layout.world, layout, KINDS, STEPS, MICRO, GLOBAL,
                              timeout_s=240)
    for rank, per_kind in enumerate(results):
        for kind in KINDS:
            got, ref = per_kind[kind], reference[kind]
            assert len(got) == STEPS + 1
            for i, ((loss, norm), (rloss, rnorm)) in enumerate(zip(got, ref)):
                assert loss == pytest.approx(rloss, rel=1e-5), (kind, rank, i)
                assert norm == pytest.approx(rnorm, rel=1e-5, abs=1e-7), (kind, rank, i)
    assert reference["gpt"][-2][0] < reference["gpt"][0][0]  # it trains


LORA_LAYOUTS = [Layout(tp=2, pp=2), Layout(dp=2)]


def _lora_worker(rank, world, layout):
    from megapre.model.lora import LoRAConfig
    from megapre.parallel import ParallelConfig
    from megapre.train.task_stages import Adaptation

    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=layout.tp,
                                            pipeline_parallel=layout.pp), device="cpu")
    return train("gpt", mesh, 6, MICRO, GLOBAL,
                 adaptation=Adaptation(lora=LoRAConfig(rank=2, alpha=4.0)))


@pytest.fixture(scope="module")
def lora_reference():
    from megapre.model.lora import LoRAConfig
    from megapre.train.task_stages import Adaptation

    return train("gpt", ParallelMesh.single(device="cpu"), 6, MICRO, GLOBAL,
                 adaptation=Adaptation(lora=LoRAConfig(rank=2, alpha=4.0)))


@pytest.mark.parametrize("layout", LORA_LAYOUTS, ids=str)
def test_lora_finetune_layout_matches_single_process(layout, lora_reference):
    """LoRA (adapters on every target, base frozen) under PP x TP and DP: DDP waits only for
    what trains, and the partial-over-TP adapter grads are summed like one process's."""
    for got in run_distributed(_lora_worker, layout.world, layout, timeout_s=240):
        for (loss, norm), (rloss, rnorm) in zip(got, lora_reference):
            assert loss == pytest.approx(rloss, rel=1e-5)
            assert norm == pytest.approx(rnorm, rel=1e-5, abs=1e-7)
    assert lora_reference[-2][0] < lora_reference[0][0]
