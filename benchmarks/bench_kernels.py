"""Kernel benchmarks: megapre's fused ops vs the torch eager path they replace, measured in the
same run on the same machine, forward + backward where the op has one.

    python benchmarks/bench_kernels.py                 # CPU, 2 threads, all kernels
    python benchmarks/bench_kernels.py --quick         # fewer repeats (the README's smoke run)
    python benchmarks/bench_kernels.py --device cuda   # GPU (absolute numbers are meaningful there)
    python benchmarks/bench_kernels.py --only norm,softmax --json out.json

Prints, per case: our time, the peer's time, the ratio (peer / ours, > 1 = we are faster), the
issue's target ratio, and effective GB/s (norms, softmax: minimal bytes moved / time) or GOP/s
(GEMMs), next to the machine's measured copy bandwidth and fp32 matmul rate.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import megapre.ops as ops


@dataclass
class Row:
    name: str
    ours_ms: float
    peer_ms: float
    peer: str
    target: float | None
    rate: float  # GB/s or GOP/s of our kernel
    unit: str

    @property
    def ratio(self) -> float:
        return self.peer_ms / self.ours_ms

    @property
    def met(self) -> str:
        return "-" if self.target is None else ("yes" if self.ratio >= self.target else "NO")


def steady_heap() -> None:
    """Keep freed blocks in glibc's heap: otherwise every large tensor is a fresh mmap and page
    faults, not the kernels, dominate CPU timings (both sides get the same treatment)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)            # M_MMAP_MAX = 0: no mmap for big blocks
        libc.mallopt(-1, 2**31 - 1)    # M_TRIM_THRESHOLD: never give the heap top back
    except OSError:
        pass


def timeit(fn: Callable[[], object], device: str, min_time: float, warmup: int = 3) -> float:
    """Median seconds per call over repeats lasting about min_time in total."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(3, min(200, int(min_time / once)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(fn, inputs, grads):
    """Closure running fn(*inputs) forward and backward with fixed output grads."""
    def run():
        for t in inputs:
            t.grad = None
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads[: len(outs)])
    return run


class Bench:
    def __init__(self, device: str, min_time: float):
        self.device, self.min_time = device, min_time
        self.rows: list[Row] = []

    def t(self, fn) -> float:
        return timeit(fn, self.device, self.min_time)

    def add(self, name, ours, peer, peer_name, target, work, unit):
        o, p = self.t(ours), self.t(peer)
        row = Row(name, o * 1e3, p * 1e3, peer_name, target, work / o / 1e9, unit)
        self.rows.append(row)
        tgt = f">={row.target:.1f}x" if row.target else ""
        print(f"{name:44s} {row.ours_ms:9.3f} {row.peer_ms:9.3f}  {row.ratio:6.2f}x {tgt:>7s} "
              f"{row.met:>4s}  {row.rate:8.1f} {unit:5s} vs {peer_name}", flush=True)


# ---- machine limits ----------------------------------------------------------------------------

def copy_bandwidth(dev: str, min_time: float) -> float:
    src = torch.empty(64 * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)
    src.uniform_()
    s = timeit(lambda: dst.copy_(src), dev, min_time)
    return 2 * src.numel() * 4 / s / 1e9


def matmul_rate(dev: str, min_time: float, n: int = 2048, dtype=torch.float32) -> float:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    s = timeit(lambda: torch.matmul(a, b, out=out), dev, min_time)
    return 2 * n**3 / s / 1e9


# ---- cases ---------------------------------------------------------------------------------------

def bench_norms(b: Bench, quick: bool) -> None:
    dev = b.device
    shapes = [(8192, 1024)] if quick else [(8192, 1024), (2048, 4096)]
    for rows, h in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            tag = f"{rows}x{h} {str(dtype)[6:]}"
            es = torch.tensor([], dtype=dtype).element_size()
            x = torch.randn(rows, h, device=dev, dtype=dtype, requires_grad=True)
            r = torch.randn(rows, h, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(h, device=dev, dtype=dtype, requires_grad=True)
            bias = torch.randn(h, device=dev, dtype=dtype, requires_grad=True)
            dy = torch.randn(rows, h, device=dev, dtype=dtype)
            ds = torch.randn(rows, h, device=dev, dtype=dtype)
            n = rows * h * es
            params = [x, w, bias]
            b.add(f"layer_norm fwd+bwd {tag}",
                  fwd_bwd(lambda: ops.layer_norm(x, w, bias), params, [dy]),
                  fwd_bwd(lambda: F.layer_norm(x, (h,), w, bias), params, [dy]),
                  "F.layer_norm", 1.0 if dtype == torch.float32 else 1.8, 5 * n, "GB/s")
            eps = 1e-6
            b.add(f"rms_norm fwd+bwd {tag}",
                  fwd_bwd(lambda: ops.rms_norm(x, w, eps), [x, w], [dy]),
                  fwd_bwd(lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w, [x, w], [dy]),
                  "torch composite", 4.0, 5 * n, "GB/s")

            def unfused():
                s = x + r
                return F.layer_norm(s, (h,), w, bias), s

            b.add(f"residual+layer_norm fwd+bwd {tag}",
                  fwd_bwd(lambda: ops.layer_norm(x, w, bias, residual=r), [x, r, w, bias], [dy, ds]),
                  fwd_bwd(unfused, [x, r, w, bias], [dy, ds]),
                  "add + F.layer_norm", 1.6, 8 * n, "GB/s")


def bench_softmax(b: Bench, quick: bool) -> None:
    dev = b.device
    bs, heads, sq = 4, 16, 512
    scale = 0.125
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float16)
    for dtype in dtypes:
        es = torch.tensor([], dtype=dtype).element_size()
        s = torch.randn(bs, heads, sq, sq, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn_like(s)
        lengths = torch.tensor([sq, sq * 3 // 4, sq // 2, sq - 7], device=dev)
        pad = (torch.arange(sq, device=dev)[None, :] >= lengths[:, None])[:, None, None, :]
        pad = pad.expand(bs, 1, sq, sq).contiguous()
        tri = torch.ones(sq, sq, dtype=torch.bool, device=dev).triu(1)[None, None]
        n = s.numel() * es
        tag = f"{bs}x{heads}x{sq}x{sq} {str(dtype)[6:]}"
        b.add(f"softmax padding-mask fwd+bwd {tag}",
              fwd_bwd(lambda: ops.scale_mask_softmax(s, pad, scale), [s], [g]),
              fwd_bwd(lambda: (s * scale).masked_fill(pad, float("-inf")).softmax(-1), [s], [g]),
              "masked_fill+softmax", 3.0, 5 * n, "GB/s")
        b.add(f"softmax causal fwd+bwd {tag}",
              fwd_bwd(lambda: ops.scale_mask_softmax(s, None, scale, causal=True), [s], [g]),
              fwd_bwd(lambda: (s * scale).masked_fill(tri, float("-inf")).softmax(-1), [s], [g]),
              "masked_fill(triu)+softmax", 4.0, 5 * n, "GB/s")


def bench_gelu(b: Bench, quick: bool) -> None:
    """The MLP activation: fc1's bias + tanh GELU, forward and backward (with the bias grad)."""
    dev = b.device
    shapes = [(2048, 4096)] if quick else [(2048, 4096), (8192, 1024)]
    for rows, h in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            es = torch.tensor([], dtype=dtype).element_size()
            x = torch.randn(rows, h, device=dev, dtype=dtype, requires_grad=True)
            bias = torch.randn(h, device=dev, dtype=dtype, requires_grad=True)
            dy = torch.randn(rows, h, device=dev, dtype=dtype)
            b.add(f"bias_gelu fwd+bwd {rows}x{h} {str(dtype)[6:]}",
                  fwd_bwd(lambda: ops.bias_gelu(x, bias), [x, bias], [dy]),
                  fwd_bwd(lambda: F.gelu(x + bias, approximate="tanh"), [x, bias], [dy]),
                  "add + F.gelu(tanh)", None, 5 * rows * h * es, "GB/s")


def bench_int8(b: Bench, quick: bool) -> None:
    dev = b.device
    shapes = [(512, 1024, 1024)] if quick else [(2048, 4096, 4096), (512, 1024, 1024)]
    for m, k, n in shapes:
        tag = f"M={m} K={k} N={n}"
        x = torch.randn(m, k, device=dev)
        lin = torch.nn.Linear(k, n).to(dev)
        w, bias = lin.weight.detach(), lin.bias.detach()
        wq, ws = ops.quantize_per_channel(w)
        xq, xs = ops.quantize_per_token(x)
        out = torch.empty(m, n, device=dev)
        ops_count = 2 * m * n * k
        b.add(f"int8_gemm W8A8 {tag}",
              lambda: ops.int8_gemm(xq, xs, wq, ws, bias),
              lambda: torch.matmul(x, w.t(), out=out), "fp32 matmul", 1.5, ops_count, "GOP/s")
        if dev == "cpu":
            qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                          dtype=torch.qint8)
            with torch.inference_mode():
                b.add(f"int8_linear dynamic W8A8 {tag}",
                      lambda: ops.int8_linear(x, wq, ws, bias),
                      lambda: qlin(x), "quantize_dynamic (FBGEMM)", 1.0, ops_count, "GOP/s")
        else:
            xb, wb = x.bfloat16(), w.bfloat16()
            b.add(f"int8_gemm W8A8 vs bf16 {tag}",
                  lambda: ops.int8_gemm(xq, xs, wq, ws, None, torch.bfloat16),
                  lambda: torch.matmul(xb, wb.t()), "bf16 matmul", 1.6, ops_count, "GOP/s")
    # Weight-only GEMV: cycle through enough distinct weights that they stream from DRAM.
    k = n = 4096
    copies = 4 if quick else 12
    wf = [torch.randn(n, k, device=dev) for _ in range(copies)]
    wqs = [ops.quantize_per_channel(w_) for w_ in wf]
    state = {"i": 0}
    for m in (1, 8) if not quick else (1,):
        x = torch.randn(m, k, device=dev)

        def ours():
            state["i"] = (state["i"] + 1) % copies
            q, s_ = wqs[state["i"]]
            return ops.weight_only_int8_linear(x, q, s_)

        def peer():
            state["i"] = (state["i"] + 1) % copies
            return F.linear(x, wf[state["i"]])

        with torch.inference_mode():
            b.add(f"weight_only_int8 M={m} K={k} N={n} (DRAM)", ours, peer, "fp32 F.linear",
                  3.0 if m == 1 else None, n * k / 1.0, "GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--only", default="norm,softmax,gelu,int8",
                    help="comma list of: norm, softmax, gelu, int8")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU")
    steady_heap()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    min_time = 0.3 if args.quick else 1.5
    info = ops.backend_info()
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"megapre kernels benchmark: {where}, torch {torch.__version__}, threads {args.threads}, "
          f"backend {info['backend']} (cpu isa {info['cpu_isa']})")
    bw = copy_bandwidth(args.device, min_time)
    flops = matmul_rate(args.device, min_time)
    print(f"machine: copy {bw:.1f} GB/s, fp32 matmul {flops:.1f} GFLOP/s")
    print(f"{'case':44s} {'ours ms':>9s} {'peer ms':>9s}  {'ratio':>7s} {'target':>7s} {'met':>4s}  {'rate':>8s}")
    b = Bench(args.device, min_time)
    wanted = set(args.only.split(","))
    if "norm" in wanted:
        bench_norms(b, args.quick)
    if "softmax" in wanted:
        bench_softmax(b, args.quick)
    if "gelu" in wanted:
        bench_gelu(b, args.quick)
    if "int8" in wanted:
        bench_int8(b, args.quick)
    met = sum(r.met == "yes" for r in b.rows)
    total = sum(r.target is not None for r in b.rows)
    print(f"targets met: {met}/{total}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "copy_GBps": bw, "matmul_GFLOPs": flops,
                       "rows": [asdict(r) | {"ratio": r.ratio, "met": r.met} for r in b.rows]}, f, indent=1)


if __name__ == "__main__":
    main()
