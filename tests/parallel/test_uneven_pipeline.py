"""Megatron-LM's uneven pipeline splits (--decoder-first/last-pipeline-num-layers,
--account-for-embedding/loss-in-pipeline-split).

(a) The layer counts and ranges of megapre.parallel.layout against Megatron's rules (the cases of
    Megatron's own test_layer_builder, with the counts worked out by hand from its
    get_num_layers_to_build / layer-offset logic).
(b) Impossible splits are refused in one line naming the flags.
(c) A tiny GPT (and BERT once) trained a few steps under uneven PP2 / PP4 layouts, with and
    without virtual stages (chunks with no transformer layer included), gives the losses of one
    process to 1e-5.
(d) Checkpoints stay layout-independent: saved under an uneven split, loaded under PP1 (and the
    other way round), the logits are identical.
(e) The flags reach the run: megapre.pretrain under torchrun trains like one process, and the
    banner shows the layers per stage.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_gpt_flags, write_counting_corpus
from layout_cases import (micro_batches, model_config, one_thread, preload_worker_modules,
                          train)
from megapre.cli.flags import parse_config
from megapre.data.tokenizers import build_tokenizer
from megapre.errors import ConfigError
from megapre.launch.memory import stage_params, total_params
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel.layout import StageSplit, chunk_layers, chunk_ranges
from megapre.parallel.pipeline import local_chunks
from megapre.parallel.testing import run_distributed
from megapre.train import banner
from megapre.train.args import validate
from megapre.train.checkpoint import load_checkpoint, save_checkpoint
from megapre.train.loop import Trainer
from megapre.train.parallel_model import ParallelModel
from megapre.train.step import StepConfig, TrainStep

E, L = StageSplit(account_for_embedding=True), StageSplit(account_for_loss=True)
EL = StageSplit(account_for_embedding=True, account_for_loss=True)

# (num_layers, pp, virtual, split) -> layers per [rank][chunk], by Megatron's rules
MEGATRON_COUNTS = [
    (8, 4, None, StageSplit(1, 1), [[1], [3], [3], [1]]),
    (7, 3, None, EL, [[2], [3], [2]]),  # 9 slots / 3; embedding and loss take one each
    (60, 5, None, StageSplit(last_layers=4), [[14]] * 4 + [[4]]),
    (60, 8, None, StageSplit(6, 6), [[6]] + [[8]] * 6 + [[6]]),
    (60, 6, None, StageSplit(first_layers=5), [[5]] + [[11]] * 5),
    (64, 4, None, StageSplit(), [[16]] * 4),
    (64, 4, 8, StageSplit(), [[2] * 8] * 4),
    (63, 4, None, E, [[15], [16], [16], [16]]),
    (63, 4, None, L, [[16], [16], [16], [15]]),
    (62, 4, None, EL, [[15], [16], [16], [15]]),
    (62, 4, 2, EL, [[7, 8], [8, 8], [8, 8], [8, 7]]),
    (12, 4, 2, StageSplit(2, 2), [[1, 1], [2, 2], [2, 2], [1, 1]]),
    (6, 4, 2, EL, [[0, 1], [1, 1], [1, 1], [1, 0]]),  # the functional-test config's split
]
# Megatron's error cases: (num_layers, pp, virtual, split)
MEGATRON_ERRORS = [
    (101, 8, None, StageSplit(13, 13)),  # 75 left for 6 stages
    (65, 4, None, StageSplit()),
    (65, 4, None, EL),  # 67 slots
    (61, 4, None, StageSplit(first_layers=12)),  # 49 left for 3 stages
    (2, 4, None, StageSplit()),
    (60, 6, None, StageSplit(5, 5, account_for_embedding=True)),  # the two ways mixed
    (50, 2, 7, StageSplit()),
    (4, 4, 4, StageSplit()),
    (12, 4, 2, StageSplit(1, 1)),  # one layer on the first stage, two virtual chunks
    (4, 4, None, StageSplit(2, 2)),  # the middle stages would hold no layer
    (8, 2, None, StageSplit(3, 4)),  # PP2: first + last must be all the layers
    (8, 1, None, StageSplit(first_layers=8)),  # PP1 has no first/last stage to weigh
]


@pytest.mark.parametrize("num_layers,pp,virtual,split,counts", MEGATRON_COUNTS)
def test_chunk_layers_match_megatron(num_layers, pp, virtual, split, counts):
    assert chunk_layers(num_layers, pp, virtual, split) == counts
    ranges = chunk_ranges(num_layers, pp, virtual, split)
    flat = sorted(r for per_rank in ranges for r in per_rank)  # in virtual-stage order
    assert flat[0][0] == 0 and flat[-1][1] == num_layers
    assert all(a[1] == b[0] for a, b in zip(flat, flat[1:]))  # contiguous, every layer once


def test_chunk_ranges_follow_megatron_offsets():
    """Megatron's layer offsets for 62 layers, PP4 x 2 virtual stages, embedding and loss
    counted: chunk c of rank p starts at c * 32 + p * 8, less one after the embedding's slot."""
    ranges = chunk_ranges(62, 4, 2, EL)
    starts = [[first for first, _ in per_rank] for per_rank in ranges]
    assert starts == [[0, 31], [7, 39], [15, 47], [23, 55]]
    assert ranges[3][1] == (55, 62)
    specs = local_chunks(62, 4, 3, 2, EL)  # the last rank: virtual stages 3 and 7
    assert [(s.stage_index, s.first_layer, s.last_layer, s.is_last) for s in specs] == [
        (3, 23, 31, False), (7, 55, 62, True)]


@pytest.mark.parametrize("num_layers,pp,virtual,split", MEGATRON_ERRORS)
def test_impossible_splits_are_refused(num_layers, pp, virtual, split):
    with pytest.raises(ConfigError) as e:
        chunk_layers(num_layers, pp, virtual, split)
    assert "\n" not in str(e.value)


# -- the flags -----------------------------------------------------------------------------------

BASE = ["--num-layers", "8", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "8",
        "--data-path", "A"]


def _plan(*flags: str, world: int = 4):
    return validate(parse_config(BASE + list(flags)), world)


def test_flags_reach_the_layout():
    plan = _plan("--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers",
                 "1", "--decoder-last-pipeline-num-layers", "1")
    assert plan.config.parallel.stage_split() == StageSplit(1, 1)
    # Megatron counts the embedding and loss slots in --num-layers-per-virtual-pipeline-stage
    plan = _plan("--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split",
                 "--account-for-loss-in-pipeline-split",
                 "--num-layers-per-virtual-pipeline-stage", "1", world=2)
    assert plan.virtual_pipeline == 5 and plan.pipeline_schedule == "interleaved-1f1b"


@pytest.mark.parametrize("flags,named", [
    (["--decoder-first-pipeline-num-layers", "2"],
     ["--decoder-first-pipeline-num-layers 2", "--pipeline-model-parallel-size >= 2 (got 1)"]),
    (["--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "1",
      "--decoder-last-pipeline-num-layers", "2"], ["--decoder-last-pipeline-num-layers 2",
                                                   "--num-layers 8"]),
    (["--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "4",
      "--decoder-last-pipeline-num-layers", "4"], ["leave 0 of --num-layers 8"]),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "0"],
     ["--decoder-first-pipeline-num-layers", "positive"]),
    (["--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "2",
      "--account-for-loss-in-pipeline-split"], ["--decoder-first-pipeline-num-layers 2",
                                                "--account-for-loss-in-pipeline-split"]),
    (["--pipeline-model-parallel-size", "4", "--account-for-embedding-in-pipeline-split"],
     ["--num-layers 8 + 1", "--account-for-embedding-in-pipeline-split",
      "--pipeline-model-parallel-size 4"]),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "4",
      "--num-layers-per-virtual-pipeline-stage", "2"], ["--num-virtual-stages-per-pipeline-rank"]),
    (["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split",
      "--account-for-loss-in-pipeline-split", "--num-virtual-stages-per-pipeline-rank", "3"],
     ["--account-for-loss-in-pipeline-split", "3 virtual stages"]),
])
def test_bad_combinations_name_the_flags(flags, named):
    with pytest.raises(ConfigError) as e:
        _plan(*flags, world=int(flags[1]) if flags[0] == "--pipeline-model-parallel-size" else 1)
    message = str(e.value)
    assert "\n" not in message
    for word in named:
        assert word in message, message


def test_memory_estimate_counts_each_stage_layers():
    mc = parse_config(BASE).transformer_config(1000)
    split = StageSplit(1, 1)
    per_stage = [stage_params(mc, "gpt", 1, 4, s, split=split) for s in range(4)]
    total, _ = total_params(mc, "gpt")
    word = mc.padded_vocab_size(1) * mc.hidden_size
    assert sum(per_stage) == total + word  # the last stage's copy of the tied word table
    assert per_stage[1] == per_stage[2] == 3 * (per_stage[1] // 3)


# -- training and checkpoints across processes ---------------------------------------------------

STEPS, MICRO, GLOBAL = 4, 2, 8
RTOL = 1e-5
CFG = dict(num_layers=6)  # 6 layers cut many ways


def _mesh(pp: int, vp: int | None, split: StageSplit) -> ParallelMesh:
    return ParallelMesh.init(ParallelConfig(pipeline_parallel=pp, virtual_pipeline=vp,
                                            stage_split=split), device="cpu")


# (pp, virtual stages, split, model kinds)
LAYOUTS = [
    (2, None, StageSplit(first_layers=2), ("gpt",)),  # [2, 4]
    (4, None, StageSplit(1, 1), ("gpt",)),  # [1, 2, 2, 1]
    (2, None, EL, ("gpt", "bert")),  # [3, 3] of 8 slots
    (2, 2, EL, ("gpt",)),  # [[1, 2], [2, 1]], interleaved
    (4, 2, EL, ("gpt",)),  # [[0, 1], [1, 1], [1, 1], [1, 0]]: chunks of embedding / head only
]
LAYOUT_IDS = ["pp2-first2", "pp4-first1-last1", "pp2-embedding-loss", "pp2-vp2-embedding-loss",
              "pp4-vp2-embedding-loss"]


def train_worker(rank, world, pp, vp, split, kinds):
    mesh = _mesh(pp, vp, split)
    schedule = "interleaved-1f1b" if vp else None
    return {k: train(k, mesh, STEPS, MICRO, GLOBAL, schedule, cfg=model_config(**CFG))
            for k in kinds}


@pytest.fixture(scope="module")
def reference():
    preload_worker_modules()
    with one_thread():
        return {k: train(k, ParallelMesh.single(device="cpu"), STEPS, MICRO, GLOBAL,
                         cfg=model_config(**CFG)) for k in ("gpt", "bert")}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("pp,vp,split,kinds", LAYOUTS, ids=LAYOUT_IDS)
def test_uneven_layout_matches_single_process(pp, vp, split, kinds, reference):
    results = run_distributed(train_worker, pp, pp, vp, split, kinds, timeout_s=300)
    for rank, per_kind in enumerate(results):
        for kind in kinds:
            got, ref = per_kind[kind], reference[kind]
            assert len(got) == len(ref) == STEPS + 1
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref)):
                where = f"{kind} pp{pp} vp{vp} {split.flags()} rank {rank} step {step}"
                assert _close(loss, ref_loss), f"{where}: loss {loss} vs {ref_loss}"
                assert _close(norm, ref_norm), f"{where}: grad norm {norm} vs {ref_norm}"


def _tokens() -> torch.Tensor:
    return micro_batches("gpt", 7, GLOBAL, GLOBAL, 0, 1)[0]["tokens"]


def _logits(model: ParallelModel) -> torch.Tensor | None:
    """Forward of the whole model chunk by chunk in virtual-stage order, the hidden states
    passed between pipeline ranks by hand (world = PP here, so global rank = pipeline rank).
    The logits on the rank of the last stage, None elsewhere."""
    tokens, mesh = _tokens(), model.mesh
    x = None
    with torch.no_grad():
        for spec, chunk in zip(model.specs, model.models):
            if spec.is_first:
                x = chunk(input_ids=tokens)
            else:
                x = torch.empty(tokens.shape[1], tokens.shape[0], model.adapter.cfg.hidden_size)
                dist.recv(x, src=(spec.stage_index - 1) % mesh.pp_size)
                x = chunk(hidden_states=x)
            if not spec.is_last:
                dist.send(x.contiguous(), dst=(spec.stage_index + 1) % mesh.pp_size)
    return x if model.specs[-1].is_last else None


def _model(mesh: ParallelMesh, seed: int):
    model = ParallelModel.build("gpt", model_config(**CFG), mesh, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    return model, opt


def save_worker(rank, world, pp, vp, split, root):
    """Two training steps in this layout, a checkpoint, and the logits after them."""
    mesh = _mesh(pp, vp, split) if world > 1 else ParallelMesh.single(device="cpu")
    model, opt = _model(mesh, seed=5)
    step = TrainStep(model, opt, StepConfig(MICRO, GLOBAL, pipeline_schedule=(
        "interleaved-1f1b" if vp else None)))
    for it in range(2):
        step(iter(micro_batches("gpt", it, GLOBAL, MICRO, mesh.dp_rank, mesh.dp_size)))
    save_checkpoint(root, 2, model, opt, mesh, consumed_samples=2 * GLOBAL)
    model.eval()
    return _logits(model) if world > 1 else model.models[0](input_ids=_tokens()).detach()


def load_worker(rank, world, pp, vp, split, root):
    """A differently initialized model in this layout, loaded from `root`: its logits."""
    mesh = _mesh(pp, vp, split) if world > 1 else ParallelMesh.single(device="cpu")
    model, opt = _model(mesh, seed=99)
    info = load_checkpoint(root, model, opt, mesh)
    assert info["iteration"] == 2, info
    model.eval()
    return _logits(model) if world > 1 else model.models[0](input_ids=_tokens()).detach()


def _last_logits(results: list) -> torch.Tensor:
    """The one rank's logits over the true vocabulary (checkpoints drop the padding rows)."""
    found = [r for r in results if r is not None]
    assert len(found) == 1
    return found[0][..., :model_config(**CFG).vocab_size]


@pytest.mark.slow
@pytest.mark.parametrize("pp,vp,split", [(4, None, StageSplit(1, 1)), (2, 2, EL)],
                         ids=["pp4-first1-last1", "pp2-vp2-embedding-loss"])
def test_checkpoints_move_between_uneven_and_pp1(pp, vp, split, tmp_path):
    preload_worker_modules()
    uneven, single = str(tmp_path / "uneven"), str(tmp_path / "single")
    saved = _last_logits(run_distributed(save_worker, pp, pp, vp, split, uneven, timeout_s=300))
    loaded = _last_logits(run_distributed(load_worker, 1, 1, None, StageSplit(), uneven,
                                          timeout_s=300))
    assert torch.equal(loaded, saved), (loaded - saved).abs().max()
    saved = _last_logits(run_distributed(save_worker, 1, 1, None, StageSplit(), single,
                                         timeout_s=300))
    loaded = _last_logits(run_distributed(load_worker, pp, pp, vp, split, single, timeout_s=300))
    assert torch.equal(loaded, saved), (loaded - saved).abs().max()


def test_banner_shows_the_layers_per_stage():
    cfg = parse_config(BASE + ["--pipeline-model-parallel-size", "2", "--tokenizer-type",
                               "NullTokenizer", "--vocab-size", "39",
                               "--account-for-embedding-in-pipeline-split",
                               "--account-for-loss-in-pipeline-split",
                               "--num-virtual-stages-per-pipeline-rank", "1"])
    tok = build_tokenizer(cfg.tokenizer_config())
    layout_line = banner.config_lines(validate(cfg, 2, tok.vocab_size), 2, tok)[1]
    assert "layers per stage 4/4; " in layout_line, layout_line


# -- the whole program ---------------------------------------------------------------------------

def _cli_args(corpus: str, work, *extra: str) -> list[str]:
    return tiny_gpt_flags(corpus, work, *extra, num_layers=6)


def _cli_losses(work) -> list[float]:
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r and "loss" in r]


@pytest.mark.slow
def test_torchrun_pretrain_with_megatron_split_flags(tmp_path):
    """megapre.pretrain under torchrun, PP2 x 2 virtual stages with the embedding and loss
    counted (chunks of 1+2 / 2+1 layers), trains like one process: the flags reach the mesh."""
    corpus = write_counting_corpus(str(tmp_path / "count_text_document"))
    single, piped = tmp_path / "single", tmp_path / "pp2"
    with one_thread():
        trainer = Trainer(parse_config(_cli_args(corpus, single)))
        try:
            trainer.train()
        finally:
            trainer.close()
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megapre.pretrain", *_cli_args(
               corpus, piped, "--pipeline-model-parallel-size", "2",
               "--num-virtual-stages-per-pipeline-rank", "2",
               "--account-for-embedding-in-pipeline-split",
               "--account-for-loss-in-pipeline-split")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "layers per stage 1+2/2+1; " in run.stdout, run.stdout[-3000:]
    ref, got = _cli_losses(single), _cli_losses(piped)
    assert len(got) == len(ref) == 3
    assert all(_close(a, b) for a, b in zip(got, ref)), (got, ref)
