"""Pipeline pieces: stage cutting, schedule checks, the step's input errors, the global grad norm
against torch's in one process, and (spawned) the options that cross stage boundaries: document
masks and positions reaching every stage, untied output layers, recomputation, BERT without its
binary head, and tied word-embedding copies that stay equal on the first and last stage."""
from __future__ import annotations

import pytest
import torch

from layout_cases import micro_batches, model_config, preload_worker_modules
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel.grads import clip_grad_norm_
from megapre.parallel.pipeline import check_schedule, local_chunks
from megapre.parallel.testing import run_distributed
from megapre.train.parallel_model import ParallelModel
from megapre.train.step import StepConfig, TrainStep


# -- stage cutting and checks ---------------------------------------------------------------------
def test_local_chunks_interleave_like_megatron():
    # 8 layers, PP 2 x 2 virtual stages: rank 0 runs virtual stages 0 and 2, rank 1 runs 1 and 3
    r0, r1 = local_chunks(8, 2, 0, 2), local_chunks(8, 2, 1, 2)
    assert [(c.stage_index, c.first_layer, c.last_layer) for c in r0] == [(0, 0, 2), (2, 4, 6)]
    assert [(c.stage_index, c.first_layer, c.last_layer) for c in r1] == [(1, 2, 4), (3, 6, 8)]
    assert r0[0].is_first and not r0[1].is_last and r1[1].is_last
    whole = local_chunks(4, 1, 0)
    assert len(whole) == 1 and whole[0].is_first and whole[0].is_last
    assert (whole[0].first_layer, whole[0].last_layer) == (0, 4)


def test_local_chunks_reject_uneven_split():
    with pytest.raises(ValueError, match="--num-layers 6 is not divisible by .* 2 x 2"):
        local_chunks(6, 2, 0, 2)


@pytest.mark.parametrize("name,pp,vp,n,match", [
    ("zb", 2, None, 4, "not one of"),
    ("interleaved-1f1b", 2, None, 4, "needs --num-layers-per-virtual-pipeline-stage"),
    ("1f1b", 2, 2, 4, "use --pipeline-schedule interleaved"),
    ("1f1b", 4, None, 2, "at least as many micro-batches"),
    ("interleaved-1f1b", 4, 2, 9, "multiple of 4"),
])
def test_check_schedule_errors(name, pp, vp, n, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(name, pp, vp, n)


def test_num_microbatches():
    assert StepConfig(2, 16).num_microbatches(4) == 2
    with pytest.raises(ValueError, match="--global-batch-size 10 is not divisible by "
                                         "--micro-batch-size 2 x data-parallel size 2"):
        StepConfig(2, 10).num_microbatches(2)
    with pytest.raises(ValueError, match="--micro-batch-size must be a positive integer"):
        StepConfig(0, 8).num_microbatches(1)


# -- single process: grad norm and the step's input errors ----------------------------------------
def _single_step(kind="gpt", micro=2, global_size=4):
    mesh = ParallelMesh.single(device="cpu")
    model = ParallelModel.build(kind, model_config(num_layers=2), mesh, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, TrainStep(model, opt, StepConfig(micro, global_size, clip_grad=0.5))


def test_grad_norm_and_clip_match_torch():
    model, step = _single_step()
    params = list(model.parameters())
    step._norm = step.adapter.normalizers(torch.tensor([4 * 8.0, 4.0]))
    step._accumulate([step.adapter.split(m) for m in micro_batches("gpt", 0, 4, 2, 0, 1)])
    expect_grads = [p.grad.clone() for p in params]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, g in zip(clones, expect_grads):
        c.grad = g.clone()
    torch_norm = float(torch.nn.utils.clip_grad_norm_(clones, 0.5))
    norm = clip_grad_norm_(params, 0.5, step.mesh)
    assert norm == pytest.approx(torch_norm, rel=1e-6)
    assert norm > 0.5  # clipping happened
    for p, c in zip(params, clones):
        torch.testing.assert_close(p.grad, c.grad, rtol=1e-6, atol=1e-9)


def test_step_rejects_bad_micro_batches():
    _, step = _single_step()
    good = micro_batches("gpt", 0, 4, 2, 0, 1)
    with pytest.raises(RuntimeError, match="ran out after 1 of 2 micro-batches"):
        step(iter(good[:1]))
    missing = [{k: v for k, v in m.items() if k != "loss_mask"} for m in good]
    with pytest.raises(KeyError, match="GPT micro-batch lacks loss_mask"):
        step(iter(missing))
    with pytest.raises(ValueError, match="micro-batch 0 has 4 samples, expected "
                                         "--micro-batch-size 2"):
        step(iter(micro_batches("gpt", 0, 8, 4, 0, 1)))
    zero = [dict(m, loss_mask=torch.zeros_like(m["loss_mask"])) for m in good]
    with pytest.raises(ValueError, match="no token with a non-zero loss_mask"):
        step(iter(zero))


def test_unknown_model_kind():
    with pytest.raises(ValueError, match="--model 't5' is not one of gpt, bert"):
        ParallelModel.build("t5", model_config(), ParallelMesh.single(device="cpu"))


# -- spawned: options that cross stage boundaries -------------------------------------------------
def _documents(mb: dict) -> dict:
    """Two documents per sample (split at position 3): reset positions + block-causal mask."""
    b, s = mb["tokens"].shape
    seg = (torch.arange(s) >= 3).long()
    pos = torch.arange(s) - 3 * seg
    mask = seg[:, None] != seg[None, :]  # True = masked (across documents)
    return dict(mb, position_ids=pos.expand(b, s).clone(),
                attention_mask=mask.expand(b, 1, s, s).clone())


VARIANTS = {
    "gpt-docs-rope": ("gpt", dict(position_embedding_type="rope"), {}, True),
    "gpt-untied-recompute": ("gpt", dict(untie_embeddings_and_output_weights=True),
                             dict(recompute_granularity="full"), False),
    "bert-no-binary": ("bert", {}, dict(add_binary_head=False), False),
}


def _run_variant(mesh: ParallelMesh, name: str, steps: int = 3):
    kind, cfg_kw, build_kw, docs = VARIANTS[name]
    cfg = model_config()
    for k, v in cfg_kw.items():
        setattr(cfg, k, v)
    model = ParallelModel.build(kind, cfg, mesh, seed=9, **build_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = TrainStep(model, opt, StepConfig(2, 4, clip_grad=1.0))
    out = []
    for it in range(steps):
        mbs = micro_batches(kind, it, 4, 2, mesh.dp_rank, mesh.dp_size)
        if docs:
            mbs = [_documents(m) for m in mbs]
        r = step(iter(mbs))
        out.append((r.loss, r.grad_norm, sorted(r.parts)))
        if it == 0:  # evaluation between training steps leaves the schedule ready to train
            ev = step.evaluate(iter(mbs))
            out.append((ev["loss"], 0.0, sorted(k for k in ev if k != "loss")))
    ends = [m for spec, m in zip(model.specs, model.models) if spec.is_first or spec.is_last]
    tied = ends[0].shared_embedding_weight()  # first stage's table or last stage's copy
    return out, None if tied is None else tied.detach().clone()


def _variants_worker(rank, world):
    mesh = ParallelMesh.init(ParallelConfig(pipeline_parallel=2), device="cpu")
    return {name: _run_variant(mesh, name) for name in VARIANTS}


@pytest.mark.slow
def test_pipeline_variants_match_single_process():
    preload_worker_modules()
    ref = {name: _run_variant(ParallelMesh.single(device="cpu"), name) for name in VARIANTS}
    first, last = run_distributed(_variants_worker, 2, timeout_s=240)
    for name in VARIANTS:
        for got in (first[name][0], last[name][0]):
            assert len(got) == len(ref[name][0]), name
            for (loss, norm, parts), (rl, rn, rp) in zip(got, ref[name][0]):
                assert parts == rp, name
                assert loss == pytest.approx(rl, rel=1e-5), name
                assert norm == pytest.approx(rn, rel=1e-5), name
    # After 3 AdamW steps the last stage's copy of the word table still equals the first stage's
    # (and the single-process table); untied GPT has no cross-stage tie.
    for name in ("gpt-docs-rope", "bert-no-binary"):
        torch.testing.assert_close(first[name][1], last[name][1], rtol=0, atol=0)
        torch.testing.assert_close(first[name][1], ref[name][1], rtol=1e-5, atol=1e-7)
    assert first["gpt-untied-recompute"][1] is None


def _short_sequence_worker(rank, world):
    mesh = ParallelMesh.init(ParallelConfig(pipeline_parallel=2), device="cpu")
    model = ParallelModel.build("gpt", model_config(), mesh, seed=1)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), StepConfig(2, 4))
    short = [{k: v[:, :6] for k, v in m.items()} for m in micro_batches("gpt", 0, 4, 2, 0, 1)]
    try:
        step(iter(short))
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
def test_pipeline_rejects_sequences_shorter_than_seq_length():
    preload_worker_modules()
    for msg in run_distributed(_short_sequence_worker, 2, timeout_s=120):
        assert "sequences of 6 tokens; with pipeline parallelism every sample must have " \
               "--seq-length 8" in msg, msg
