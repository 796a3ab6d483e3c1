"""The distributed optimizer (--use-distributed-optimizer, ZeRO-1) trains exactly like torch's
AdamW behind DDP: in DP2, TP2 x DP2, PP2 x DP2 (tied word embedding across stages) and
TP2 x PP2 x DP2 with sequence parallelism and interleaved 1F1B, losses
and global grad norms of a few steps with clipping and decay / no-decay groups equal the
single-process run within 1e-5 relative, with and without overlapped grad reduce-scatter and
param all-gather (small buckets, so several of them are in flight). Each rank's AdamW state is
1/DP of the whole stage's (the memory estimator's formula, checked against the bytes held).
"""
from __future__ import annotations

import pytest
import torch

from layout_cases import Layout, micro_batches, model_config, preload_worker_modules
from megapre.cli.flags import parse_config
from megapre.launch.memory import estimate
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel.testing import run_distributed
from megapre.train.optim import ShardingArgs, build_optimizer
from megapre.train.parallel_model import ParallelModel
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
                schedule: str | None = None) -> dict:
    cfg = model_config()
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
    out = []
    for it in range(STEPS):
        mbs = micro_batches(kind, it % 2, GLOBAL, MICRO, mesh.dp_rank, mesh.dp_size)
        r = step(iter(mbs))
        out.append((r.loss, r.grad_norm))
    held_out = micro_batches(kind, 99, GLOBAL, MICRO, mesh.dp_rank, mesh.dp_size)
    out.append((step.evaluate(iter(held_out))["loss"], 0.0))  # forward after the last gather
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"losses": out, "state_bytes": state, "params": params, "launched": launched}


def worker(rank: int, world: int, layout: Layout, kinds: tuple[str, ...]) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=layout.tp,
                                            pipeline_parallel=layout.pp,
                                            virtual_pipeline=layout.vp,
                                            sequence_parallel=layout.sp), device="cpu")
    out = {(kind, name): run_variant(kind, mesh, sharding, layout.schedule)
           for kind in kinds for name, sharding in VARIANTS.items()}
    out["pp_rank"] = mesh.pp_rank
    return out


def estimated_optimizer_bytes(kind: str, layout: Layout, stage: int, sharded: bool) -> int:
    """The memory estimator's per-rank AdamW bytes for the tests' tiny model in `layout`."""
    cfg = model_config()
    flags = ["--model", kind, "--num-layers", str(cfg.num_layers),
             "--hidden-size", str(cfg.hidden_size),
             "--num-attention-heads", str(cfg.num_attention_heads),
             "--seq-length", str(cfg.seq_length), "--make-vocab-size-divisible-by", "8",
             "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL),
             "--tensor-model-parallel-size", str(layout.tp),
             "--pipeline-model-parallel-size", str(layout.pp)]
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
