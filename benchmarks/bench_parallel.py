"""Parallel layouts on this machine: step time and communication volume of a GPT training step in
every (TP, PP, DP) layout, against the single-process run and against the standard formulas; and
the single-process model's tokens/s against a plain eager nanoGPT-style GPT of the same size.

    python benchmarks/bench_parallel.py                  # all layouts + the nanoGPT comparison
    python benchmarks/bench_parallel.py --quick          # fewer steps (smoke run)
    python benchmarks/bench_parallel.py --layouts tp2,pp2 --skip-nanogpt

Bytes are counted inside every rank by wrapping torch.distributed's collectives and the pipeline's
send ops; each call is charged the bytes one rank puts on the wire with the usual ring algorithms
(all-reduce 2(n-1)/n x size, all-gather and reduce-scatter (n-1)/n x full size, send = size).
Expected bytes per rank and step (fp32, micro-batch b, sequence s, hidden h, m micro-batches per
step, L layers on the rank, t = TP, d = DP, P = this rank's parameter count):

    TP   m x [4 L b s h  (2 all-reduces forward, 2 backward per layer; sequence parallel: 4
              all-gathers + 4 reduce-scatters, the same wire bytes)
              + b s h for the embedding (first stage; + b s h backward under SP)
              + b s h for the output layer's input (last stage; all-reduce, or AG + RS under SP)
              + 3 b s for the vocab-parallel cross entropy] x ring factor
         + the sequence-parallel parameters' grad all-reduce (norms, row-parallel biases)
    DP   one all-reduce of the P gradients: 2 (d-1)/d x 4 P
    PP   per micro-batch and chunk boundary: s/t' b h activations forward + as much gradient back
    EMB  tied word-embedding grad all-reduce between first and last stage: (V/t) h
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megapre.model.config import TransformerConfig
from megapre.parallel import comm
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.parallel.testing import run_distributed
from megapre.train.parallel_model import ParallelModel
from megapre.train.step import StepConfig, TrainStep

BYTES = 4  # fp32


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int | None = None
    sp: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        s = f"tp{self.tp} pp{self.pp} dp{self.dp}"
        return s + (f" vp{self.vp}" if self.vp else "") + (" sp" if self.sp else "")


LAYOUTS = {
    "single": Layout(), "tp2": Layout(tp=2), "tp2sp": Layout(tp=2, sp=True),
    "pp2": Layout(pp=2), "dp2": Layout(dp=2), "tp2pp2": Layout(tp=2, pp=2),
    "tp2dp2": Layout(tp=2, dp=2), "pp2dp2": Layout(pp=2, dp=2),
    "tp2pp2dp2": Layout(tp=2, pp=2, dp=2, sp=True), "pp2vp2": Layout(pp=2, vp=2),
}


@dataclass(frozen=True)
class Shape:
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    seq: int = 64
    vocab: int = 1000
    micro: int = 2
    global_batch: int = 8

    def config(self, backend: str = "sdpa") -> TransformerConfig:
        return TransformerConfig(num_layers=self.layers, hidden_size=self.hidden,
                                 num_attention_heads=self.heads, vocab_size=self.vocab,
                                 seq_length=self.seq, max_position_embeddings=self.seq,
                                 hidden_dropout=0.0, attention_dropout=0.0,
                                 attention_backend=backend)


# -- byte counting -----------------------------------------------------------------------------
class CommCounter:
    """Wire bytes per process group kind, from wrapped torch.distributed calls."""

    def __init__(self, mesh: ParallelMesh) -> None:
        self.kinds = {id(g): kind for kind, g in (
            ("emb", mesh.embedding_group), ("pp", mesh.pp_group), ("dp", mesh.dp_group),
            ("tp", mesh.tp_group)) if g is not None}
        self.bytes: dict[str, float] = {}
        self._orig = {}

    def _add(self, group, nbytes: float) -> None:
        kind = self.kinds.get(id(group), "other")
        self.bytes[kind] = self.bytes.get(kind, 0.0) + nbytes

    @staticmethod
    def _n(group) -> int:
        return dist.get_world_size(group)

    def install(self) -> None:
        o = self._orig = {name: getattr(dist, name) for name in (
            "all_reduce", "all_gather_single", "reduce_scatter_single", "send", "P2POp")}
        o["all_gather_single"] = getattr(comm, "_all_gather_single", o["all_gather_single"])
        o["reduce_scatter_single"] = getattr(comm, "_reduce_scatter_single",
                                             o["reduce_scatter_single"])
        counter = self

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            n = counter._n(group)
            counter._add(group, 2 * (n - 1) / n * tensor.numel() * tensor.element_size())
            return o["all_reduce"](tensor, op=op, group=group, async_op=async_op)

        def all_gather_single(output, input, group=None, async_op=False):
            n = counter._n(group)
            counter._add(group, (n - 1) / n * output.numel() * output.element_size())
            return o["all_gather_single"](output, input, group=group, async_op=async_op)

        def reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=None,
                                  async_op=False):
            n = counter._n(group)
            counter._add(group, (n - 1) / n * input.numel() * input.element_size())
            return o["reduce_scatter_single"](output, input, op=op, group=group,
                                              async_op=async_op)

        def send(tensor, dst=None, group=None, tag=0, group_dst=None):
            counter._add(group, tensor.numel() * tensor.element_size())
            return o["send"](tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)

        class P2POp(o["P2POp"]):  # the pipeline schedules' isend/irecv
            def __init__(self, op, tensor, peer=None, group=None, tag=0, group_peer=None):
                super().__init__(op, tensor, peer, group, tag, group_peer)
                if op is dist.isend:
                    counter._add(group, tensor.numel() * tensor.element_size())

        dist.all_reduce, dist.all_gather_single = all_reduce, all_gather_single
        dist.reduce_scatter_single, dist.send, dist.P2POp = reduce_scatter_single, send, P2POp
        # megapre.parallel.comm binds its gather/scatter functions at import: rebind those too
        for name, wrapper in (("_all_gather_single", all_gather_single),
                              ("_reduce_scatter_single", reduce_scatter_single)):
            if hasattr(comm, name):
                setattr(comm, name, wrapper)

    def reset(self) -> None:
        self.bytes = {}


def expected_bytes(model: ParallelModel, mesh: ParallelMesh, shape: Shape, num_mb: int
                   ) -> dict[str, float]:
    """The formulas of the module docstring for this rank."""
    t, d = mesh.tp_size, mesh.dp_size
    b, s, h = shape.micro, shape.seq, shape.hidden
    bsh = b * s * h
    out: dict[str, float] = {}
    if t > 1:
        ring_ar, ring_half = 2 * (t - 1) / t, (t - 1) / t
        layers = sum(spec.last_layer - spec.first_layer for spec in model.specs)
        per_mb = 4 * layers * bsh * ring_ar  # TP all-reduces; SP: 8 x (t-1)/t, same bytes
        if any(spec.is_first for spec in model.specs):
            per_mb += bsh * ring_ar + (bsh * ring_half if mesh.sequence_parallel else 0)
        if any(spec.is_last for spec in model.specs):
            per_mb += bsh * (2 * ring_half if mesh.sequence_parallel else ring_ar)
            per_mb += 3 * b * s * ring_ar
        sp_params = sum(p.numel() for p in model.parameters()
                        if getattr(p, "sequence_parallel", False))
        out["tp"] = BYTES * (num_mb * per_mb + sp_params * ring_ar)
    if d > 1:
        local = sum(p.numel() for p in model.parameters())
        out["dp"] = BYTES * 2 * (d - 1) / d * local
    if mesh.pp_size > 1:
        s_local = s // t if mesh.sequence_parallel else s
        boundaries = sum((not spec.is_last) + (not spec.is_first) for spec in model.specs)
        out["pp"] = BYTES * num_mb * boundaries * s_local * b * h
        if mesh.in_embedding_group:
            w = model.tied_embedding_weight()
            out["emb"] = BYTES * (w.numel() if w is not None else 0)
    return out


# -- one layout ---------------------------------------------------------------------------------
def _batches(shape: Shape, step: int, dp_rank: int, dp: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, shape.vocab, (shape.global_batch, shape.seq + 1), generator=g)
    per = shape.global_batch // dp
    ids = ids[dp_rank * per:(dp_rank + 1) * per]
    for i in range(0, per, shape.micro):
        x = ids[i:i + shape.micro]
        yield {"tokens": x[:, :-1], "labels": x[:, 1:],
               "loss_mask": torch.ones(x.shape[0], shape.seq)}


def layout_worker(rank: int, world: int, layout: Layout, shape: Shape, warmup: int,
                  steps: int) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=layout.tp,
                                            pipeline_parallel=layout.pp,
                                            virtual_pipeline=layout.vp,
                                            sequence_parallel=layout.sp), device="cpu")
    return run_layout(mesh, shape, warmup, steps)


def run_layout(mesh: ParallelMesh, shape: Shape, warmup: int, steps: int) -> dict:
    model = ParallelModel.build("gpt", shape.config(), mesh, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = TrainStep(model, opt, StepConfig(shape.micro, shape.global_batch))
    counter = CommCounter(mesh) if dist.is_initialized() else None
    if counter:
        counter.install()
    times, losses = [], []
    for it in range(warmup + steps):
        if counter:
            counter.reset()
            dist.barrier()
        t0 = time.perf_counter()
        result = step(_batches(shape, it, mesh.dp_rank, mesh.dp_size))
        times.append(time.perf_counter() - t0)
        losses.append(result.loss)
    return {"time": statistics.median(times[warmup:]), "loss": losses,
            "bytes": dict(counter.bytes) if counter else {},
            "expected": expected_bytes(model, mesh, shape, step.num_microbatches)}


# -- nanoGPT-style reference model ---------------------------------------------------------------
class NanoBlock(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc, self.out = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, h))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """nanoGPT's model.py shape: token + position embeddings, pre-LN blocks, tied head."""

    def __init__(self, shape: Shape, vocab: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, shape.hidden)
        self.wpe = nn.Embedding(shape.seq, shape.hidden)
        self.blocks = nn.ModuleList(NanoBlock(shape.hidden, shape.heads)
                                    for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(shape.hidden)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


class NanoTrainer:
    """nanoGPT's training step: micro-batch accumulation, clip 1.0, AdamW."""

    def __init__(self, shape: Shape) -> None:
        torch.manual_seed(0)
        self.shape = shape
        self.model = NanoGPT(shape, shape.config().padded_vocab_size(1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def __call__(self, batches) -> None:
        n_mb = self.shape.global_batch // self.shape.micro
        self.opt.zero_grad(set_to_none=True)
        for mb in batches:
            (self.model(mb["tokens"], mb["labels"]) / n_mb).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


def megapre_trainer(shape: Shape, backend: str) -> TrainStep:
    model = ParallelModel.build("gpt", shape.config(backend), ParallelMesh.single(device="cpu"),
                                seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return TrainStep(model, opt, StepConfig(shape.micro, shape.global_batch))


NANO = "nanoGPT-style eager"


def compare_with_nanogpt(shape: Shape, steps: int, warmup: int
                         ) -> dict[str, tuple[float, float]]:
    """Per trainer: (tokens/s of its fastest step, median over rounds of nanoGPT's step time /
    its step time in the same round). The trainers take turns step by step, so load from other
    jobs on a shared machine hits them alike; the paired median is the robust ratio."""
    trainers = {NANO: NanoTrainer(shape),
                "megapre (sdpa attention)": megapre_trainer(shape, "sdpa"),
                "megapre (fused attention)": megapre_trainer(shape, "fused")}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for it in range(warmup + steps):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer(_batches(shape, it, 0, 1))
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: (shape.global_batch * shape.seq / min(t),
                   statistics.median(a / b for a, b in zip(times[NANO], t)))
            for name, t in times.items()}


# -- report ---------------------------------------------------------------------------------------
def _fmt_bytes(x: float) -> str:
    return f"{x / 2**20:.2f} MiB" if x >= 2**20 else f"{x / 2**10:.1f} KiB"


def bench_layouts(names: list[str], shape: Shape, warmup: int, steps: int) -> bool:
    from megapre.parallel import testing

    # DDP and the schedules import torch._dynamo (seconds per process): once in the fork server
    testing._context().set_forkserver_preload(
        ["torch", "torch.distributed", "torch._dynamo", "torch.distributed.pipelining",
         "megapre.train.step"])
    print(f"GPT {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, seq "
          f"{shape.seq}, vocab {shape.vocab}; micro-batch {shape.micro}, global batch "
          f"{shape.global_batch}; fp32; torch {torch.__version__}, {torch.get_num_threads()} "
          "threads in the parent, 1 per rank")
    print(f"{'layout':<20} {'ranks':>5} {'step ms':>9} {'vs 1 proc':>9}  "
          f"{'group':<4} {'measured/step':>14} {'formula/step':>14} {'ratio':>6}")
    base, ok = None, True
    for name in names:
        layout = LAYOUTS[name]
        if layout.world == 1:
            torch.set_num_threads(1)
            results = [run_layout(ParallelMesh.single(device="cpu"), shape, warmup, steps)]
        else:
            results = run_distributed(layout_worker, layout.world, layout, shape, warmup, steps,
                                      timeout_s=600)
        step_ms = max(r["time"] for r in results) * 1e3
        base = base or step_ms
        measured: dict[str, float] = {}
        expected: dict[str, float] = {}
        for r in results:
            for k, v in r["bytes"].items():
                measured[k] = measured.get(k, 0.0) + v
            for k, v in r["expected"].items():
                expected[k] = expected.get(k, 0.0) + v
        head = f"{layout.name:<20} {layout.world:>5} {step_ms:>9.1f} {step_ms / base:>8.2f}x"
        kinds = sorted(set(measured) | set(expected))
        if not kinds:
            print(head + "  (no communication)")
        for i, k in enumerate(kinds):
            m, e = measured.get(k, 0.0), expected.get(k, 0.0)
            ratio = m / e if e else math.inf
            ok &= (abs(ratio - 1) <= 0.10) if e else (m < 1024)
            print(f"{head if i == 0 else ' ' * len(head)}  {k:<4} {_fmt_bytes(m):>14} "
                  f"{_fmt_bytes(e):>14} {ratio:>6.3f}")
    print("bytes: summed over all ranks per optimizer step; formula ratio within 10%: "
          + ("yes" if ok else "NO"))
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", default=",".join(LAYOUTS),
                    help=f"comma-separated subset of {', '.join(LAYOUTS)}")
    ap.add_argument("--quick", action="store_true", help="2 warm-up + 3 timed steps")
    ap.add_argument("--skip-nanogpt", action="store_true")
    ap.add_argument("--skip-layouts", action="store_true")
    ap.add_argument("--rounds", type=int, default=20,
                    help="alternating rounds of the nanoGPT comparison (more = less noise)")
    args = ap.parse_args(argv)
    names = [n for n in args.layouts.split(",") if n]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layout(s) {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    warmup, steps = (2, 3) if args.quick else (2, 6)
    threads = torch.get_num_threads()
    ok = True
    if not args.skip_layouts:
        ok = bench_layouts(names, Shape(), warmup, steps)
    if not args.skip_nanogpt:
        torch.set_num_threads(threads)
        shape = Shape(layers=6, hidden=256, heads=8, seq=256, vocab=2048, micro=4,
                      global_batch=8)
        rounds = 3 if args.quick else args.rounds
        tps = compare_with_nanogpt(shape, rounds, 2)
        nano = tps[NANO][0]
        print(f"\nsingle process, GPT {shape.layers}x{shape.hidden} seq {shape.seq} batch "
              f"{shape.global_batch} ({shape.micro} per micro-batch), fwd+bwd+clip+AdamW, "
              f"{torch.get_num_threads()} threads, {rounds} alternating rounds "
              "(tokens/s of the fastest step; ratios: best-of and median of per-round pairs):")
        for name, (v, paired) in tps.items():
            ratio = "" if name == NANO else (f"  {v / nano:.2f}x best-of, {paired:.2f}x paired "
                                             "median (target >= 1.0x)")
            print(f"  {name:<28} {v:9.0f} tokens/s{ratio}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
