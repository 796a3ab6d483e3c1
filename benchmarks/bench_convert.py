"""Conversion cost of a GPT-2-shaped model (default 1.3B parameters: 24 layers, hidden 2048, 16
heads, vocab 50257, 2048 positions; random fp32 weights) against the floor a user would compare
with: `safetensors.torch.load_file` + `save_file` of the same tensors. Every command runs in its
own process (peak RSS from wait4), after a sync of the previous one's writes, with the source
file warm in the page cache.

    python benchmarks/bench_convert.py [--work DIR] [--layers 24 --hidden 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PEER = """
import os, sys
from safetensors.torch import load_file, save_file
save_file(load_file(sys.argv[1]), sys.argv[2], metadata={"format": "pt"})
if len(sys.argv) > 3:  # durable, as megapre's checkpoint writer is (it fsyncs its files)
    fd = os.open(sys.argv[2], os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


def make_source(out: Path, layers: int, hidden: int, heads: int, vocab: int,
                positions: int) -> int:
    """A GPT-2 directory with random weights, written without transformers; returns bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    h, f = hidden, 4 * hidden
    shapes = {"transformer.wte.weight": (vocab, h), "transformer.wpe.weight": (positions, h),
              "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (h,), p + "ln_1.bias": (h,), p + "ln_2.weight": (h,),
                       p + "ln_2.bias": (h,), p + "attn.c_attn.weight": (h, 3 * h),
                       p + "attn.c_attn.bias": (3 * h,), p + "attn.c_proj.weight": (h, h),
                       p + "attn.c_proj.bias": (h,), p + "mlp.c_fc.weight": (h, f),
                       p + "mlp.c_fc.bias": (f,), p + "mlp.c_proj.weight": (f, h),
                       p + "mlp.c_proj.bias": (h,)})
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.empty(s).normal_(0, 0.02, generator=gen) for k, s in shapes.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
        "n_positions": positions, "n_embd": h, "n_layer": layers, "n_head": heads,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True}))
    return sum(t.numel() * 4 for t in tensors.values())


def run(cmd: list[str], warm: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one command in its own process. The previous command's
    writes are flushed first (otherwise their writeback throttles this one) and `warm` is read
    so the source is in the page cache for every side alike."""
    os.sync()
    warm.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--positions", type=int, default=2048)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_convert-"))
    try:
        src = work / "hf"
        size = make_source(src, a.layers, a.hidden, a.heads, a.vocab, a.positions)
        gib = size / 2**30
        print(f"model: {size // 4 / 1e9:.2f}B parameters, {gib:.2f} GiB fp32", flush=True)
        py = sys.executable
        st = src / "model.safetensors"
        rows = [("safetensors load_file + save_file (peer)",
                 run([py, "-c", PEER, str(st), str(work / "copy.st")], st)),
                ("same + fsync of the written file",
                 run([py, "-c", PEER, str(st), str(work / "copy2.st"), "fsync"], st)),
                ("megapre-convert hf-import",
                 run([py, "-m", "megapre.convert", "hf-import", "--hf-dir", str(src), "--save",
                      str(work / "ckpt"), "--null-tokenizer"], st)),
                ("megapre-convert hf-export",
                 run([py, "-m", "megapre.convert", "hf-export", "--load", str(work / "ckpt"),
                      "--hf-dir", str(work / "out")], st))]
        peer = rows[0][1][0]
        print("| command | seconds | x peer | peak RSS GiB | x model size |")
        print("|---|---:|---:|---:|---:|")
        for name, (s, rss) in rows:
            print(f"| {name} | {s:.1f} | {s / peer:.2f} | {rss:.2f} | {rss / gib:.2f} |")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
