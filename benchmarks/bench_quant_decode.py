"""Int8 quantization speed on the CPU: batch-1 decode tokens/s (KV cache, greedy) of a GPT
(default 12 x 768, GPT-2 vocabulary, random weights: speed does not depend on their values) in
fp32, weight-int8, and weight-int8 with --quantize-lm-head, all in the same run; optionally
prefill tokens/s of fp32, weight-int8 and w8a8 (--prefill). Ratios are against fp32; each
number is the best of --rounds turns taken in rotation (a busy spell hits every variant).

    python benchmarks/bench_quant_decode.py                    # 2 threads, 12 x 768
    python benchmarks/bench_quant_decode.py --prefill 512      # also a 512-token prefill
    python benchmarks/bench_quant_decode.py --layers 2 --hidden 256 --new-tokens 8   # smoke run
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megapre.ops as ops  # noqa: E402
from megapre.compress import QuantConfig  # noqa: E402
from megapre.compress.structure import quantize_model  # noqa: E402
from megapre.inference.kv_cache import KVCache, stage_step  # noqa: E402
from megapre.model.config import TransformerConfig  # noqa: E402
from megapre.model.gpt import GPTModel  # noqa: E402
from megapre.parallel import ParallelMesh  # noqa: E402

WARMUP = 4  # untimed decode steps
VARIANTS = (("fp32", None), ("weight-int8", QuantConfig("weight-int8")),
            ("weight-int8 + lm head", QuantConfig("weight-int8", quantize_lm_head=True)))


def build(args: argparse.Namespace, quant: QuantConfig | None) -> GPTModel:
    """The same random model every call (seeded init), quantized as `quant` says."""
    cfg = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden,
                            num_attention_heads=args.hidden // 64, vocab_size=args.vocab,
                            seq_length=1024, max_position_embeddings=1024, hidden_dropout=0.0,
                            attention_dropout=0.0)
    mesh = ParallelMesh.single(device="cpu")
    model = GPTModel(cfg, mesh, seed=1234).eval()
    if quant is not None:
        quantize_model(model, quant, mesh)
    return model


@torch.no_grad()
def decode_tokens_per_s(model: GPTModel, prompt: int, new_tokens: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    cache = KVCache()
    logits = stage_step(model, cache, input_ids=ids)
    cache.length += prompt
    nxt = logits[-1].argmax(-1).view(1, 1)
    for _ in range(WARMUP):  # first calls pay for allocations and page faults
        logits = stage_step(model, cache, input_ids=nxt)
        cache.length += 1
        nxt = logits[-1].argmax(-1).view(1, 1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = stage_step(model, cache, input_ids=nxt)
        cache.length += 1
        nxt = logits[-1].argmax(-1).view(1, 1)
    return new_tokens / (time.perf_counter() - start)


@torch.no_grad()
def prefill_tokens_per_s(model: GPTModel, tokens: int, vocab: int, repeats: int = 3) -> float:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=ids)
    return tokens * repeats / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens timed")
    p.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many "
                                                          "tokens (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="measurements per variant (best kept)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} threads, megapre ops: {ops.backend()} "
          f"(ISA {ops.cpu_isa()}), torch {torch.__version__}")
    print(f"GPT {args.layers} x {args.hidden}, vocab {args.vocab}, batch 1, prompt "
          f"{args.prompt}, {args.new_tokens} decoded tokens")
    models = {name: build(args, quant) for name, quant in VARIANTS}
    best = best_rates(models, args.rounds,
                      lambda m: decode_tokens_per_s(m, args.prompt, args.new_tokens, args.vocab))
    report("decode ", best)
    if args.prefill:
        models["w8a8"] = build(args, QuantConfig("w8a8"))
        del models["weight-int8 + lm head"]
        report("prefill", best_rates(models, args.rounds,
                                     lambda m: prefill_tokens_per_s(m, args.prefill, args.vocab)))


def best_rates(models: dict, rounds: int, measure) -> dict[str, float]:
    """The best of `rounds` measurements per model, the models taking turns in each round (so a
    busy spell on a shared machine hits every variant alike)."""
    best = {name: 0.0 for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = max(best[name], measure(model))
    return best


def report(what: str, rates: dict[str, float]) -> None:
    base = rates["fp32"]
    for name, rate in rates.items():
        print(f"{what} {name:<24} {rate:8.2f} tokens/s   {rate / base:5.2f}x fp32", flush=True)

if __name__ == "__main__":
    main()
