"""ALBERT-style parameter sharing: --share-layers-every K (layers [jK, (j+1)K) run one weight
set) and --embedding-size E (factorized [vocab, E] tables projected to hidden; the tied head
projects back down to E). One weight set per group, whose gradient is the sum of its uses';
the KV-cache decoder equals the full recompute; the estimator counts what the model holds;
TP2 + SP, PP2 (sets within stages) and DP2 train as one process; a checkpoint resumes in
another layout; impossible settings are one-line errors naming the flag (exit 2)."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from layout_cases import Layout, layout_mesh, micro_batches, model_config, preload_worker_modules
from layout_cases import assert_same_runs, resume_losses, train
from megapre.cli.estimate_memory import main as estimate_main
from megapre.cli.flags import parse_config
from megapre.inference.kv_cache import KVCache, stage_step
from megapre.errors import ConfigError
from megapre.launch.memory import (embedding_params, layer_params, stage_params,
                                   total_params)
from megapre.parallel import ParallelMesh
from megapre.parallel.testing import run_distributed
from megapre.train.parallel_model import ParallelModel

STEPS, MICRO, GLOBAL = 3, 2, 4
# (config, lr) of the layout runs. Sharing alone trains at a large lr (a missing or doubled
# gradient shows in the loss). With E < hidden the first layer's inputs span fewer than hidden
# directions, so some of its weight grads are zero in theory and rounding noise in practice;
# AdamW's first step (about lr * g / (|g| + eps)) turns that noise into layout-dependent updates
# in proportion to lr, hence a small one there (the grads themselves agree to float precision).
RUNS = {"shared": (dict(every=2, embedding=None), 0.05),
        "factorized": (dict(every=2, embedding=16), 1e-4)}
KINDS = ("bert", "gpt")


def _config(every: int = 2, embedding: int | None = 16, **kw):
    cfg = model_config()
    cfg.share_layers_every, cfg.embedding_size = every, embedding
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _single(kind: str, cfg, seed: int = 5):
    return ParallelModel.build(kind, cfg, ParallelMesh.single(device="cpu"), seed=seed,
                               ddp=False).models[0]


def _stack(model):
    return model.decoder if hasattr(model, "decoder") else model.encoder


@pytest.mark.parametrize("kind", KINDS)
def test_all_layers_share_one_block(kind):
    cfg = _config(every=4, embedding=None)
    model = _single(kind, cfg)
    stack = _stack(model)
    assert list(stack.layers) == ["0"]
    assert [n for n, _ in stack.uses()] == [0, 1, 2, 3]
    assert all(layer is stack.layers["0"] for _, layer in stack.uses())
    one_layer = _single(kind, _config(every=1, embedding=None, num_layers=1))
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in one_layer.parameters())
    assert count == total_params(cfg, kind)[0]
    assert sum(p.numel() for p in stack.parameters()) == layer_params(cfg)


@pytest.mark.parametrize("kind", KINDS)
def test_shared_gradient_is_the_sum_of_its_uses(kind):
    """A shared model against an unshared one whose layers are copies of the sets."""
    shared = _single(kind, _config(every=2))
    plain = _single(kind, _config(every=1))
    state = {}
    for name, p in shared.named_parameters():
        state[name] = p
        for layer in range(4):  # the copy of each set under every layer that reuses it
            owner = f".layers.{layer - layer % 2}."
            if owner in name:
                state[name.replace(owner, f".layers.{layer}.")] = p
    plain.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    batch = micro_batches(kind, 0, 2, 2, 0, 1)[0]
    losses = [_loss(kind, m, batch) for m in (shared, plain)]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    for loss in losses:
        loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in shared.named_parameters():
        if ".layers." not in name:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7)
            continue
        owner = int(re.search(r"\.layers\.(\d+)\.", name).group(1))
        uses = [grads[name.replace(f".layers.{owner}.", f".layers.{i}.")].grad
                for i in (owner, owner + 1)]
        torch.testing.assert_close(p.grad, uses[0] + uses[1], rtol=1e-5, atol=1e-7)


def _loss(kind: str, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind == "gpt":
        return model(input_ids=batch["tokens"], labels=batch["labels"]).sum()
    labels = batch["labels"].clamp(min=0)
    loss, binary = model(input_ids=batch["text"], tokentype_ids=batch["types"],
                         padding_mask=batch["padding_mask"] == 0, labels=labels)
    return (loss * batch["loss_mask"]).sum() + binary.sum()


@pytest.mark.parametrize("untied", [False, True])
def test_kv_cache_equals_full_recompute(untied):
    gpt = _single("gpt", _config(untie_embeddings_and_output_weights=untied))
    gpt.eval()
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = gpt(input_ids=ids)
        cache, pieces = KVCache(), []
        for lo, hi in ((0, 5), (5, 6), (6, 8)):
            pieces.append(stage_step(gpt, cache, input_ids=ids[:, lo:hi]))
            cache.length = hi
    assert sorted(cache.layers) == [0, 1, 2, 3]  # one cache slot per layer, not per set
    torch.testing.assert_close(torch.cat(pieces), full, rtol=1e-5, atol=1e-5)


def test_flags_reach_the_model_config():
    cfg = parse_config(["--num-layers", "4", "--share-layers-every", "2", "--embedding-size", "16"])
    mc = cfg.transformer_config(100)
    assert (mc.share_layers_every, mc.embedding_size, mc.embedding_dim) == (2, 16, 16)
    assert parse_config([]).transformer_config(100).embedding_dim == 768


BASE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "2",
        "--vocab-size", "100"]


@pytest.mark.parametrize("flags, world, needle", [
    (["--share-layers-every", "3"], 1, "--share-layers-every 3 does not divide --num-layers 4"),
    (["--share-layers-every", "0"], 1, "--share-layers-every=0"),
    (["--share-layers-every", "4", "--pipeline-model-parallel-size", "2"], 2,
     "splits a shared set"),
    (["--share-layers-every", "2", "--pipeline-model-parallel-size", "2",
      "--decoder-first-pipeline-num-layers", "1"], 2, "splits a shared set"),
    (["--embedding-size", "32"], 1, "--embedding-size=32 must be a positive integer below "
                                    "--hidden-size=32"),
    (["--embedding-size", "0"], 1, "--embedding-size=0"),
], ids=["not-dividing", "zero", "straddles-pp", "straddles-uneven", "e-not-below-h", "e-zero"])
def test_bad_sharing_is_one_line_exit_2(flags, world, needle, capsys):
    assert estimate_main(BASE + flags + ["--world-size", str(world)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_estimator_reports_the_shared_count(capsys):
    assert estimate_main(BASE + ["--share-layers-every", "4", "--embedding-size", "8",
                                 "--world-size", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = parse_config(BASE + ["--share-layers-every", "4", "--embedding-size", "8"])
    mc = cfg.transformer_config(100)
    model = _single("gpt", mc)
    assert out["total_params"] == sum(p.numel() for p in model.parameters())


def test_pipeline_stages_count_their_own_sets():
    """PP2 with one set per stage: each stage holds one block; the last stage's copy of the tied
    table is [vocab, E] and its down-projection hidden -> E."""
    mc = parse_config(BASE + ["--share-layers-every", "2", "--embedding-size", "8"]
                      ).transformer_config(100)
    first, last = (stage_params(mc, "gpt", 1, 2, s) for s in (0, 1))
    assert first + last == total_params(mc, "gpt")[0] + mc.padded_vocab_size(1) * 8
    assert first == layer_params(mc) + embedding_params(mc, "gpt")


@pytest.mark.parametrize("flags", [["--share-layers-every", "2"], ["--embedding-size", "16"]])
def test_hf_and_mcore_exports_refuse_sharing(flags):
    from megapre.convert.hf_families import family_for_export
    from megapre.convert.mcore_export import _refuse_model

    m = dataclasses.asdict(parse_config(["--num-layers", "4"] + flags).model)
    for export in (family_for_export, _refuse_model):
        with pytest.raises(ConfigError, match=flags[0]):
            export(m)


# -- layouts -----------------------------------------------------------------------------------

def _runs(mesh: ParallelMesh) -> dict[tuple[str, str], list[tuple[float, float]]]:
    return {(name, k): train(k, mesh, STEPS, MICRO, GLOBAL, cfg=_config(**kw), lr=lr)
            for name, (kw, lr) in RUNS.items() for k in KINDS}


def _worker(rank: int, world: int, layout: Layout
            ) -> dict[tuple[str, str], list[tuple[float, float]]]:
    return _runs(layout_mesh(layout))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [Layout(tp=2, sp=True), Layout(pp=2), Layout(dp=2)], ids=str)
def test_sharing_matches_single_process(layout):
    preload_worker_modules()
    ref = _runs(ParallelMesh.single(device="cpu"))
    for got in run_distributed(_worker, layout.world, layout, timeout_s=240):
        for kind in ref:
            assert_same_runs(got[kind], ref[kind], kind)


def _resume_steps(mesh: ParallelMesh, root: str, seed: int, save: bool) -> dict[str, list[float]]:
    return {k: resume_losses(k, _config(), mesh, root, seed, save, MICRO, GLOBAL) for k in KINDS}


def _resume_worker(rank: int, world: int, layout: Layout, root: str) -> dict[str, list[float]]:
    return _resume_steps(layout_mesh(layout), root, seed=99, save=False)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [Layout(tp=2, sp=True), Layout(pp=2)], ids=str)
def test_sharing_checkpoint_resumes_in_another_layout(layout, tmp_path):
    preload_worker_modules()
    ref = _resume_steps(ParallelMesh.single(device="cpu"), str(tmp_path), seed=5, save=True)
    for got in run_distributed(_resume_worker, layout.world, layout, str(tmp_path),
                               timeout_s=240):
        for kind in KINDS:
            assert got[kind] == pytest.approx(ref[kind], rel=1e-5), kind
