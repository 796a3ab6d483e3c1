"""The distributed optimizer on this machine: per-rank AdamW memory (measured, against the memory
estimator's formula) and step time of a DP training step, behind DDP and with
--use-distributed-optimizer without and with overlapped communication; and the losses, which
must agree to 1e-5 relative.

    python benchmarks/bench_distributed_optimizer.py               # DP2, gloo on the CPU
    python benchmarks/bench_distributed_optimizer.py --dp 4 --steps 10 --hidden 512
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megapre.launch.memory import optimizer_bytes
from megapre.model.config import TransformerConfig
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel.testing import run_distributed
from megapre.train.optim import ShardingArgs, build_optimizer
from megapre.train.parallel_model import ParallelModel
from megapre.train.step import StepConfig, TrainStep

VARIANTS = {
    "DDP (all-reduce)": ShardingArgs(),
    "distributed optimizer": ShardingArgs(use_distributed_optimizer=True),
    "distributed optimizer, overlapped": ShardingArgs(
        use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True,
        ddp_bucket_size=500_000),
}


def _batch(step: int, size: int, seq: int, vocab: int, rank: int, dp: int, micro: int):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, vocab, (size, seq + 1), generator=g)
    per = size // dp
    mine = tokens[rank * per:(rank + 1) * per]
    return [{"tokens": mine[i:i + micro, :-1], "labels": mine[i:i + micro, 1:],
             "loss_mask": torch.ones(micro, seq)} for i in range(0, per, micro)]


def worker(rank: int, world: int, args) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(), device="cpu")
    cfg = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden,
                            num_attention_heads=8, vocab_size=args.vocab, seq_length=args.seq,
                            max_position_embeddings=args.seq, hidden_dropout=0.0,
                            attention_dropout=0.0)
    out = {}
    for name, sharding in VARIANTS.items():
        model = ParallelModel.build("gpt", cfg, mesh, seed=1,
                                    ddp=not sharding.use_distributed_optimizer)
        opt = build_optimizer(model, 1e-4, 0.01, sharding=sharding)
        step = TrainStep(model, opt, StepConfig(args.micro, args.micro * 2 * world))
        losses, times = [], []
        for it in range(args.steps + 1):
            t0 = time.perf_counter()
            losses.append(step(iter(_batch(it, args.micro * 2 * world, args.seq, args.vocab,
                                           rank, world, args.micro))).loss)
            times.append(time.perf_counter() - t0)
        state = sum(t.numel() * t.element_size() for s in opt.state.values()
                    for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        params = sum(p.numel() for p in model.parameters())
        out[name] = {"losses": losses, "step_s": statistics.median(times[1:]),
                     "state": state, "params": params}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=2)
    args = ap.parse_args()
    ranks = run_distributed(worker, args.dp, args, timeout_s=1800)
    base = ranks[0]["DDP (all-reduce)"]
    print(f"GPT {args.layers} layers, hidden {args.hidden}, seq {args.seq}, vocab {args.vocab}; "
          f"DP {args.dp} (gloo, CPU, {torch.get_num_threads()} threads/process before spawn)")
    print(f"{'':36s} {'AdamW MiB/rank':>15s} {'estimate':>9s} {'step s':>8s} {'max rel loss':>13s}")
    for name in VARIANTS:
        r = ranks[0][name]
        est = optimizer_bytes(r["params"], args.dp, VARIANTS[name].use_distributed_optimizer)
        rel = max(abs(a - b) / abs(b) for rank in ranks
                  for a, b in zip(rank[name]["losses"], base["losses"]))
        print(f"{name:36s} {r['state'] / 2**20:15.3f} {est / 2**20:9.3f} {r['step_s']:8.3f} "
              f"{rel:13.2e}")


if __name__ == "__main__":
    main()
