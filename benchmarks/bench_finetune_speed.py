"""Fine-tuning throughput against pretraining throughput of the same model, micro-batch size and
sequence length, measured in one process on this machine (the issue's target: fine-tuning's
real (non-padding) tokens/s >= 0.9x pretraining's tokens/s).

    python benchmarks/bench_finetune_speed.py [--kind bert|gpt] [--data sst2/train.tsv]
        [--layers 4 --hidden 128 --heads 2 --vocab-file V] [--micro-batch-size 32] [--steps 30]

Fine-tuning runs SST-2 training batches, bucketed by length, through the training step (padding
to each batch's longest sample); pretraining runs masked-LM + sentence-order (BERT) or causal-LM
(GPT) batches through the same step at the fine-tuning batches' mean padded length, so both sides
compute the same number of positions per step. Both sides: 5 warm-up steps, then --steps timed
steps, fp32, torch's default thread count. Prints both rates, the ratio and the padding fraction.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megapre.data.task_batches import BatchPlan, TaskBatches  # noqa: E402
from megapre.data.tasks import LabelSet, TaskColumns, encode_examples, read_task_file  # noqa: E402
from megapre.data.tokenizers import TokenizerConfig, build_tokenizer  # noqa: E402
from megapre.model.config import TransformerConfig  # noqa: E402
from megapre.model.heads import HeadConfig  # noqa: E402
from megapre.parallel import ParallelMesh  # noqa: E402
from megapre.train.optim import build_optimizer  # noqa: E402
from megapre.train.parallel_model import ParallelModel  # noqa: E402
from megapre.train.step import StepConfig, TrainStep  # noqa: E402
from megapre.train.task_stages import TaskAdapter  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def pretrain_batch(kind: str, b: int, s: int, vocab: int, g: torch.Generator) -> dict:
    tokens = torch.randint(5, vocab, (b, s + 1), generator=g)
    if kind == "gpt":
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s)}
    mask = (torch.rand(b, s, generator=g) < 0.15).long()
    mask[:, 1] = 1
    labels = torch.where(mask.bool(), tokens[:, :-1], torch.full((b, s), -1))
    return {"text": tokens[:, :-1], "types": (torch.arange(s)[None] >= s // 2).long().expand(b, s),
            "labels": labels, "loss_mask": mask, "padding_mask": torch.ones(b, s, dtype=torch.long),
            "is_random": torch.randint(0, 2, (b,), generator=g)}


def timed(step: TrainStep, batches, steps: int, tokens_of) -> tuple[float, float]:
    """(tokens/s, seconds) over `steps` steps after 5 warm-up steps."""
    for _ in range(5):
        step(batches)
    tokens, start = 0.0, time.perf_counter()
    for _ in range(steps):
        step(batches)
        tokens += tokens_of(step)
    seconds = time.perf_counter() - start
    return tokens / seconds, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("bert", "gpt"), default="bert")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"))
    p.add_argument("--vocab-file", default=str(ROOT.parent / "shared" / "data" / "bert" / "vocab.txt"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)

    tok = build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file=args.vocab_file))
    read = read_task_file(args.data, TaskColumns())
    labels = LabelSet.build(read.examples, None, None)
    data = encode_examples(read.examples, labels, tok, args.kind, args.seq_length)
    mesh = ParallelMesh.single(device="cpu")
    b = args.micro_batch_size
    batches = TaskBatches(data, BatchPlan(b, b, 0, 1, 1234, bucket_by_length=True), tok.pad or 0)
    cfg = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden,
                            num_attention_heads=args.heads, vocab_size=tok.vocab_size,
                            seq_length=args.seq_length, max_position_embeddings=args.seq_length)
    head = HeadConfig(labels.num_classes, "cls" if args.kind == "bert" else "last", 0.1,
                      pooler=args.kind == "bert")
    ft_model = ParallelModel.from_adapter(TaskAdapter(args.kind, cfg, mesh, head), seed=1)
    ft_step = TrainStep(ft_model, build_optimizer(ft_model, 1e-4, 0.01), StepConfig(b, b))
    it = batches.train(0)
    ft_rate, ft_s = timed(ft_step, it, args.steps, lambda s: s.normalizers.tokens)
    real, computed = batches.token_counts("train")
    padded_len = max(1, round(computed / b / (args.steps + 5)))

    pre_cfg = dataclasses.replace(cfg, seq_length=padded_len)
    pre_model = ParallelModel.build(args.kind, pre_cfg, mesh, seed=1)
    pre_step = TrainStep(pre_model, build_optimizer(pre_model, 1e-4, 0.01), StepConfig(b, b))
    g = torch.Generator().manual_seed(0)

    def pre_batches():
        while True:
            yield pretrain_batch(args.kind, b, padded_len, tok.vocab_size, g)
    pre_rate, pre_s = timed(pre_step, pre_batches(), args.steps, lambda s: b * padded_len)

    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.kind} {args.layers}x{args.hidden}, vocab {tok.vocab_size}, micro-batch {b}")
    print(f"fine-tuning  {args.data}: {ft_rate:,.0f} real tokens/s ({args.steps} steps, "
          f"{ft_s:.1f} s), padding {100 * (1 - real / computed):.1f}% of computed positions, "
          f"mean padded length {computed / b / (args.steps + 5):.1f}")
    print(f"pretraining  seq {padded_len}: {pre_rate:,.0f} tokens/s ({args.steps} steps, {pre_s:.1f} s)")
    print(f"ratio fine-tuning / pretraining = {ft_rate / pre_rate:.2f} (target >= 0.9)")
    return 0 if math.isfinite(ft_rate) else 1


if __name__ == "__main__":
    sys.exit(main())
