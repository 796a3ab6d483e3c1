"""The contract of issue 4: with the same seed and data, every (TP, PP, DP) layout trains GPT and
BERT exactly like one process. Losses and global grad norms of 10 AdamW steps (grad clipping at
1.0 active), then a forward-only evaluation loss, must agree with the single-process run to 1e-5
relative at every step, on every rank.

One spawn per layout runs both models; the tiny shapes keep the 8-process layouts fast on 2 cores.
"""
from __future__ import annotations

import pytest

from layout_cases import Layout, layout_worker, one_thread, preload_worker_modules, train
from megapre.parallel import ParallelMesh
from megapre.parallel.testing import run_distributed

STEPS, MICRO, GLOBAL = 10, 2, 8
KINDS = ("gpt", "bert")
RTOL = 1e-5

LAYOUTS = [
    Layout(tp=2),
    Layout(tp=2, sp=True),
    Layout(pp=2),  # 1F1B
    Layout(pp=2, schedule="gpipe"),
    Layout(dp=2),
    Layout(tp=2, pp=2, sp=True),
    Layout(tp=2, dp=2),
    Layout(pp=2, dp=2, schedule="gpipe"),
    Layout(tp=2, pp=2, dp=2, sp=True),
    Layout(pp=2, vp=2),  # interleaved 1F1B, 4 chunks of 1 layer
    Layout(tp=2, pp=2, dp=2, vp=2, sp=True),  # interleaved with every other dimension
]


@pytest.fixture(scope="module")
def reference():
    preload_worker_modules()
    with one_thread():
        return {k: train(k, ParallelMesh.single(device="cpu"), STEPS, MICRO, GLOBAL)
                for k in KINDS}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_layout_matches_single_process(layout, reference):
    results = run_distributed(layout_worker, layout.world, layout, KINDS, STEPS, MICRO, GLOBAL,
                              timeout_s=240)
    for rank, per_kind in enumerate(results):
        for kind in KINDS:
            got, ref = per_kind[kind], reference[kind]
            assert len(got) == len(ref) == STEPS + 1  # + the forward-only evaluation after training
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref)):
                where = f"{kind} {layout} rank {rank} step {step}"
                assert _rel(loss, ref_loss) <= RTOL, f"{where}: loss {loss} vs {ref_loss}"
                assert _rel(norm, ref_norm) <= RTOL, f"{where}: grad norm {norm} vs {ref_norm}"


def test_reference_learns_and_clips(reference):
    """Guards the test itself: the losses move, and the norms exceed the clip threshold (so the
    clipping coefficient is part of what the layouts must reproduce)."""
    for kind in KINDS:
        losses = [loss for loss, _ in reference[kind][:STEPS]]
        assert losses[-2] < losses[0] - 1e-2, (kind, losses)  # same batch at even steps
        assert all(norm > 1.0 for _, norm in reference[kind][:STEPS]), (kind, reference[kind])
