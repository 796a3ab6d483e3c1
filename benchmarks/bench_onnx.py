"""ONNX Runtime (CPU) latency of an exported GPT against megapre's eager forward on the same
model: by default 6 layers, hidden 512, 8 heads, GPT-2's vocabulary (50257, padded to 50304),
learned positions, random fp32 weights; batch 1 at sequence 128 and 512; the same thread count
on both sides (torch.set_num_threads / ORT intra-op threads, inter-op 1). Each timing is the
median of --runs forward passes after --warmup ones, the two sides alternating; both return
the [1, s, 50257] logits. Parity is max |ORT - eager| / max |eager|.

    python benchmarks/bench_onnx.py [--threads 2] [--runs 20] [--seqs 128 512]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megapre.convert import onnx as onnx_export  # noqa: E402
from megapre.convert import onnx_graph  # noqa: E402
from megapre.model.config import TransformerConfig  # noqa: E402
from megapre.model.gpt import GPTModel  # noqa: E402
from megapre.parallel.mesh import ParallelMesh  # noqa: E402


def build_model(layers: int, hidden: int, heads: int, vocab: int, positions: int) -> GPTModel:
    cfg = TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            vocab_size=vocab, max_position_embeddings=positions,
                            seq_length=positions, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(cfg, ParallelMesh.single(device="cpu"), seed=0).eval()


def median_ms(fns: list[Callable[[], object]], warmup: int, runs: int) -> list[float]:
    """Median milliseconds of each fn, the fns interleaved run by run so that a change in the
    machine's background load (a shared host) hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(ts) for ts in times]


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.layers, args.hidden, args.heads, args.vocab, max(args.seqs))
    spec = onnx_graph.gpt_spec(model, args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt.onnx"
        onnx_export.write_atomic(onnx_export.trace(spec, onnx_export.MIN_OPSET), path)
        sess = session(path, args.threads)
        eager = spec.module.eval()
        print(f"GPT {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch 1, "
              f"fp32, {args.threads} threads, median of {args.runs} runs ({args.warmup} warmup)")
        print(f"{'seq':>5} {'eager ms':>10} {'ORT ms':>10} {'eager/ORT':>10} {'parity':>10}")
        for seq in args.seqs:
            ids = torch.randint(0, args.vocab, (1, seq),
                                generator=torch.Generator().manual_seed(seq))
            feed = {"input_ids": ids.numpy()}
            with torch.no_grad():
                ref = eager(ids).numpy()
                got = sess.run(None, feed)[0]
                t_eager, t_ort = median_ms([lambda: eager(ids), lambda: sess.run(None, feed)],
                                           args.warmup, args.runs)
            parity = float(np.abs(got - ref).max() / np.abs(ref).max())
            print(f"{seq:>5} {t_eager:>10.1f} {t_ort:>10.1f} {t_eager / t_ort:>9.2f}x "
                  f"{parity:>10.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
