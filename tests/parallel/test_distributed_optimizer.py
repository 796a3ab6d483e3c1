"""The distributed optimizer (--use-distributed-optimizer, ZeRO-1) trains exactly like torch's
AdamW behind DDP: in DP2, TP2 x DP2, PP2 x DP2 (tied word embedding across stages) and
TP2 x PP2 x DP2 with sequence parallelism and interleaved 1F1B, losses
and global grad norms of a few steps with clipping and decay / no-decay groups equal the
single-process run within 1e-5 relative, with and without overlapped grad reduce-scatter and
param all-gather (small buckets, so several of them are in flight). Each rank's AdamW state is
1/DP of the whole stage's (the memory estimator's formula, checked against the bytes held).

With --num-distributed-optimizer-instances 2 (DP4, and DP2 x CP2) the state is sharded over each
half of DP x CP and the halves all-reduce the reduced shards: losses, grad norms, params norms and
zero-gradient counts still equal one process, and each rank holds 1/(DP x CP / 2) of the state.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from layout_cases import Layout, micro_batches, model_config, one_thread, preload_worker_modules
from megapre.cli.flags import parse_config
from megapre.errors import ConfigError
from megapre.model.config import TransformerConfig
from megapre.launch.memory import estimate
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel.distributed_optimizer import DistributedOptimizer
from megapre.parallel.param_stats import global_param_norm, global_zeros_in_grad
from megapre.parallel.testing import run_distributed
from megapre.train.optim import ShardingArgs, build_optimizer
from megapre.train.parallel_model import ParallelModel
from megapre.train.args import validate
from megapre.train.step import StepConfig, TrainStep

STEPS, MICRO, GLOBAL = 4, 2, 8
RTOL = 1e-5
VARIANTS = {
    "ddp": ShardingArgs(),
    "distopt": ShardingArgs(use_distributed_optimizer=True),
    "distopt-overlap": ShardingArgs(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                    overlap_param_gather=True, ddp_bucket_size=2000),
}


def run_variant(kind: str, mesh: ParallelMesh, sharding: ShardingArgs,
                schedule: str | None = None, cfg: TransformerConfig | None = None) -> dict:
    cfg = cfg or model_config()
    model = ParallelModel.build(kind, cfg, mesh, seed=5,
                                ddp=not sharding.use_distributed_optimizer)
    opt = build_optimizer(model, 1e-3, 0.01, sharding=sharding)
    step = TrainStep(model, opt, StepConfig(MICRO, GLOBAL, clip_grad=1.0,
                                            pipeline_schedule=schedule))
    launched = []  # buckets whose reduce-scatter the grad hooks started during backward
    if sharding.use_distributed_optimizer:
        finish = opt.finish_grad_sync
        opt.finish_grad_sync = lambda: (launched.append((opt._next_launch, len(opt.buckets))),
                                        finish())
    out, stats = [], []
    sharded = opt if isinstance(opt, DistributedOptimizer) else None
    params = [p for p in model.parameters() if p.requires_grad]
    for it in range(STEPS):
        mbs = micro_batches(kind, it % 2, GLOBAL, MICRO, mesh.dp_rank, mesh.dp_size)
        r = step(iter(mbs))
        out.append((r.loss, r.grad_norm))
        # --log-params-norm / --log-num-zeros-in-grad right after the step, as the loop logs
        stats.append((global_param_norm(params, mesh, model.tied_copies(), sharded),
                      global_zeros_in_grad(params, mesh, model.tied_copies(), sharded)))
    held_out = micro_batches(kind, 99, GLOBAL, MICRO, mesh.dp_rank, mesh.dp_size)
    out.append((step.evaluate(iter(held_out))["loss"], 0.0))  # forward after the last gather
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {"losses": out, "state_bytes": state, "params": sum(p.numel() for p in params),
            "launched": launched, "stats": stats}


def worker(rank: int, world: int, layout: Layout, kinds: tuple[str, ...]) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=layout.tp,
                                            pipeline_parallel=layout.pp,
                                            virtual_pipeline=layout.vp,
                                            sequence_parallel=layout.sp), device="cpu")
    out = {(kind, name): run_variant(kind, mesh, sharding, layout.schedule)
           for kind in kinds for name, sharding in VARIANTS.items()}
    out["pp_rank"] = mesh.pp_rank
    return out


def estimated_optimizer_bytes(kind: str, layout: Layout, stage: int, sharded: bool,
                              instances: int = 1) -> int:
    """The memory estimator's per-rank AdamW bytes for the tests' tiny model in `layout`."""
    cfg = model_config()
    flags = ["--model", kind, "--num-layers", str(cfg.num_layers),
             "--hidden-size", str(cfg.hidden_size),
             "--num-attention-heads", str(cfg.num_attention_heads),
             "--seq-length", str(cfg.seq_length), "--make-vocab-size-divisible-by", "8",
             "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL),
             "--tensor-model-parallel-size", str(layout.tp),
             "--pipeline-model-parallel-size", str(layout.pp),
             "--context-parallel-size", str(layout.cp), "--attention-dropout", "0",
             "--num-distributed-optimizer-instances", str(instances)]
    est = estimate(parse_config(flags + (["--use-distributed-optimizer"] if sharded else [])),
                   layout.world, cfg.vocab_size)
    return next(st.optimizer for st in est.stages if st.stage == stage)


@pytest.fixture(scope="module")
def reference():
    preload_worker_modules()
    mesh = ParallelMesh.single(device="cpu")
    return {k: run_variant(k, mesh, VARIANTS["ddp"])["losses"] for k in ("gpt", "bert")}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("layout,kinds", [(Layout(dp=2), ("gpt", "bert")),
                                          (Layout(tp=2, dp=2), ("gpt",)),
                                          (Layout(pp=2, dp=2), ("gpt",)),
                                          (Layout(tp=2, pp=2, dp=2, vp=2, sp=True),
                                           ("gpt", "bert"))],
                         ids=lambda v: str(v) if isinstance(v, Layout) else "+".join(v))
def test_distributed_optimizer_matches_single_process(layout, kinds, reference):
    results = run_distributed(worker, layout.world, layout, kinds, timeout_s=300)
    for rank, per in enumerate(results):
        for kind in kinds:
            ref = reference[kind]
            for name in VARIANTS:
                got = per[(kind, name)]["losses"]
                assert len(got) == len(ref) == STEPS + 1
                for i, ((loss, norm), (rl, rn)) in enumerate(zip(got, ref)):
                    where = f"{kind} {layout} {name} rank {rank} step {i}"
                    assert _rel(loss, rl) <= RTOL, f"{where}: loss {loss} vs {rl}"
                    assert _rel(norm, rn) <= RTOL, f"{where}: grad norm {norm} vs {rn}"
            overlapped = per[(kind, "distopt-overlap")]["launched"]
            assert all(n == total > 1 for n, total in overlapped), overlapped
            # AdamW's two fp32 moments held by this rank: 8 bytes per parameter behind DDP,
            # 1/DP of that sharded; the memory estimator predicts both (within 10%: the
            # buckets' padding to a multiple of DP is the only difference)
            full, sharded = per[(kind, "ddp")], per[(kind, "distopt")]
            stage = per["pp_rank"]
            assert full["state_bytes"] == estimated_optimizer_bytes(kind, layout, stage, False)
            expect = estimated_optimizer_bytes(kind, layout, stage, True)
            assert abs(sharded["state_bytes"] - expect) <= 0.10 * expect, (rank, sharded, expect)
            assert sharded["state_bytes"] <= full["state_bytes"] / layout.dp + 8 * layout.dp


def _context_worker(rank: int, world: int) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(context_parallel=2), device="cpu")
    return {name: run_variant("gpt", mesh, sharding) for name, sharding in VARIANTS.items()}


@pytest.mark.slow
def test_context_parallel_shards_over_dp_x_cp():
    """CP2 x DP2: parameters are replicated over DP and CP, so the distributed optimizer
    reduce-scatters gradients and shards AdamW over the 4 ranks of DP x CP, as Megatron does;
    losses and norms equal one process."""
    preload_worker_modules()
    ref = run_variant("gpt", ParallelMesh.single(device="cpu"), ShardingArgs())
    for got in run_distributed(_context_worker, 4, timeout_s=300):
        for name in VARIANTS:
            for (loss, norm), (rl, rn) in zip(got[name]["losses"], ref["losses"]):
                assert loss == pytest.approx(rl, rel=RTOL), name
                assert norm == pytest.approx(rn, rel=RTOL, abs=1e-12), name
        assert got["distopt"]["state_bytes"] < ref["state_bytes"] / 3  # about a quarter each


INSTANCE_VARIANTS = {name: VARIANTS[name] for name in ("distopt", "distopt-overlap")}
# Without query/key/value biases, so the zero-gradient counts are exact: a key bias's gradient
# is rounding noise around 0 (softmax ignores it), exactly 0.0 or not by the summation order.
NO_QKV_BIAS = dataclasses.replace(model_config(), add_qkv_bias=False)


def _instances_worker(rank: int, world: int, tp: int, cp: int) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=tp, context_parallel=cp,
                                            optimizer_instances=2), device="cpu")
    out = {name: run_variant("gpt", mesh, sharding, cfg=NO_QKV_BIAS) for name, sharding in
           INSTANCE_VARIANTS.items()}
    groups = (mesh.optimizer_shard_group, mesh.optimizer_instance_group)
    out["groups"] = (mesh.optimizer_shard_ranks, mesh.optimizer_instance_ranks,
                     mesh.optimizer_shard_size)
    assert [dist.get_process_group_ranks(g) for g in groups] == list(out["groups"][:2])
    return out


def _same_run(got: dict, ref: dict, where: str) -> None:
    for i, ((loss, norm), (rl, rn)) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
        assert _rel(loss, rl) <= RTOL, f"{where} step {i}: loss {loss} vs {rl}"
        assert norm == pytest.approx(rn, rel=RTOL, abs=1e-12), f"{where} step {i}: grad norm"
    for i, ((pn, zeros), (rpn, rzeros)) in enumerate(zip(got["stats"], ref["stats"],
                                                         strict=True)):
        assert _rel(pn, rpn) <= RTOL, f"{where} step {i}: params norm {pn} vs {rpn}"
        assert zeros == rzeros, f"{where} step {i}: zeros in grad {zeros} vs {rzeros}"


@pytest.mark.slow
@pytest.mark.parametrize("world,tp,cp", [(4, 1, 1), (4, 1, 2), (2, 1, 1), (4, 2, 1)],
                         ids=["dp4", "dp2-cp2", "dp2", "tp2-dp2"])
def test_optimizer_instances_match_single_process(world, tp, cp):
    """--num-distributed-optimizer-instances 2: instances are the consecutive halves of DP x CP
    (Megatron's split), each rank shards over its half and all-reduces its shard with the rank
    that owns it in the other half (DP2: no sharding left, only that all-reduce); the run
    equals one process and each rank holds 1 / (DP x CP / 2) of its stage's state."""
    preload_worker_modules()
    with one_thread():
        ref = run_variant("gpt", ParallelMesh.single(device="cpu"), ShardingArgs(),
                          cfg=NO_QKV_BIAS)
    k = world // tp // 2  # ranks per instance
    expect = estimated_optimizer_bytes("gpt", Layout(tp=tp, dp=world // tp // cp, cp=cp), 0,
                                       True, instances=2)
    for rank, got in enumerate(run_distributed(_instances_worker, world, tp, cp,
                                               timeout_s=300)):
        if tp == 1:
            first = rank // k * k
            assert got["groups"] == (list(range(first, first + k)), [rank % k, rank % k + k], k)
        else:  # DP ranks of a TP rank are TP apart: instances of one rank each
            assert got["groups"] == ([rank], [rank % tp, rank % tp + tp], 1)
        for name in INSTANCE_VARIANTS:
            _same_run(got[name], ref, f"world {world} tp{tp} cp{cp} {name} rank {rank}")
            # 1 / (DP x CP / 2) of the TP shard's state: the memory estimator's number (within
            # 10%: bucket padding, and the estimator's model has query/key/value biases)
            held = got[name]["state_bytes"]
            assert abs(held - expect) <= 0.10 * expect, (rank, name, held, expect)
            if tp == 1:
                assert abs(held - ref["state_bytes"] / k) <= 0.01 * ref["state_bytes"]
        if k > 1:
            assert all(n == total > 1 for n, total in got["distopt-overlap"]["launched"])


def _config(world: int, *flags: str):
    cfg = parse_config(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                        "--seq-length", "8", "--micro-batch-size", "1", *flags])
    cfg.data.data_path = ["unused"]
    return validate(cfg, world, 64)


@pytest.mark.parametrize("flags,message", [
    (["--num-distributed-optimizer-instances", "2"],
     "--num-distributed-optimizer-instances 2 needs --use-distributed-optimizer"),
    (["--num-distributed-optimizer-instances", "3", "--use-distributed-optimizer"],
     "--num-distributed-optimizer-instances 3 must divide the data-parallel x context-parallel "
     "size 4"),
    (["--num-distributed-optimizer-instances", "4", "--use-distributed-optimizer",
      "--context-parallel-size", "2", "--attention-dropout", "0"],
     "--num-distributed-optimizer-instances 4 must divide the data-parallel x context-parallel "
     "size 2"),
    (["--num-distributed-optimizer-instances", "0", "--use-distributed-optimizer"],
     "--num-distributed-optimizer-instances must be a positive integer, got 0"),
], ids=["no-distopt", "not-divisor", "cp-counts", "zero"])
def test_bad_instances_are_one_line_errors(flags, message):
    world = 4 if "--context-parallel-size" not in flags else 2
    with pytest.raises(ConfigError) as err:
        _config(world, *flags)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_instances_config_and_single_process_mesh():
    """A valid N reaches the config (Megatron's spelling) and the memory estimate; a mesh that
    cannot hold N instances refuses it with the same one-line error."""
    plan = _config(4, "--num-distributed-optimizer-instances", "2", "--use-distributed-optimizer")
    assert plan.config.parallel.num_distributed_optimizer_instances == 2
    with pytest.raises(ConfigError, match="^--num-distributed-optimizer-instances 2 must divide"):
        ParallelMesh.single(ParallelConfig(optimizer_instances=2), device="cpu")
    with pytest.raises(ConfigError, match="^--num-distributed-optimizer-instances must be"):
        ParallelConfig(optimizer_instances=0)
    one, two = (estimated_optimizer_bytes("gpt", Layout(dp=4), 0, True, instances=n)
                for n in (1, 2))
    assert two == pytest.approx(2 * one, abs=8)
    mesh = ParallelMesh.single(device="cpu")
    assert (mesh.optimizer_shard_size, mesh.optimizer_instances) == (1, 1)



def test_evaluation_of_a_two_instance_run_drops_the_optimizer_layout():
    """evaluate / generate / lm-eval / hf-export start from the run's saved config on their
    own layout; the optimizer instances of training must not make one process refuse it."""
    import argparse
    import copy

    from megapre.cli.common import apply_common
    from megapre.convert.hf import _single_process
    from megapre.inference.lm_eval_model import MegapreLM

    saved = _config(4, "--num-distributed-optimizer-instances", "2",
                    "--use-distributed-optimizer").config
    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              device="cpu", bf16=False, vocab_file=None, merge_file=None,
                              tokenizer_model=None)
    evaluated = apply_common(copy.deepcopy(saved), args)
    scored = copy.deepcopy(saved)
    MegapreLM._apply_job(scored, 1, 1, "cpu", False, {})
    exported = copy.deepcopy(saved)
    _single_process(exported)
    for cfg in (evaluated, scored, exported):
        assert cfg.parallel.num_distributed_optimizer_instances == 1
        assert validate(cfg, 1, 64).dp_size == 1
