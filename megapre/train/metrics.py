"""What a run reports: model FLOPs per token, throughput, MFU against the device's dense peak,
and the sinks (console, JSONL, TensorBoard, W&B).

FLOPs are *model* FLOPs (recomputation is not counted), Megatron's convention: per token and
layer, 2 x every weight multiply (QKV with grouped-query heads, output projection, the MLP with 2
or 3 matrices), 2 x 2 x s x heads x head_dim for the attention scores and weighted values, plus
the logits; training is 3x the forward (backward = 2x).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from megapre.model.config import TransformerConfig

# Dense (no sparsity) peak TFLOP/s per device, by name fragment; bf16/fp16 tensor cores.
GPU_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
                   ("A800", 312.0), ("L40S", 362.0), ("A10", 125.0), ("V100", 125.0))


def flops_per_token(cfg: TransformerConfig, seq_length: int, training: bool = True) -> float:
    h, hd = cfg.hidden_size, cfg.head_dim
    nh, ng, f = cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    qkv = 2 * h * (nh + 2 * ng) * hd
    attn = 2 * 2 * seq_length * nh * hd
    proj = 2 * nh * hd * h
    mlp = 2 * h * f * (3 if cfg.activation == "swiglu" else 2)
    logits = 2 * h * cfg.padded_vocab_size(1)
    forward = cfg.num_layers * (qkv + attn + proj + mlp) + logits
    return 3.0 * forward if training else float(forward)


def measured_cpu_peak_tflops(n: int = 1024, repeats: int = 5) -> float:
    """The CPU's fp32 matmul rate with this process's threads: the honest 'peak' for MFU on a
    CPU, where no datasheet number applies."""
    g = torch.Generator().manual_seed(0)  # never touch the global RNG (exact resume)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def device_peak_tflops(device: torch.device) -> tuple[float, str]:
    """(peak TFLOP/s, how it was obtained)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS:
            if key in name:
                return peak, f"{name} dense bf16 datasheet"
        return float("nan"), f"{name}: peak unknown"
    return measured_cpu_peak_tflops(), "measured fp32 matmul"


@dataclass
class Throughput:
    tokens_per_s: float
    tflops_per_device: float
    mfu: float


def throughput(tokens: int, seconds: float, flops_token: float, world_size: int,
               peak_tflops: float) -> Throughput:
    tps = tokens / max(seconds, 1e-9)
    tflops = tps * flops_token / world_size / 1e12
    return Throughput(tps, tflops, tflops / peak_tflops if peak_tflops == peak_tflops else float("nan"))


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem_allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
                "mem_max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        return {"max_rss_gb": rss}
    except ImportError:  # not on Linux/macOS
        return {}


class MetricsLogger:
    """Fans one record out to the console, a JSONL file, TensorBoard and W&B. Only the rank that
    owns the loss (last pipeline stage, TP 0, DP 0) is created with enabled=True."""

    def __init__(self, enabled: bool, metrics_path: str | None = None,
                 tensorboard_dir: str | None = None, wandb_project: str | None = None,
                 wandb_name: str | None = None, config: dict | None = None,
                 stream: TextIO = sys.stdout) -> None:
        self.enabled = enabled
        self.stream = stream
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        if metrics_path:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
            self._jsonl = open(metrics_path, "a", buffering=1, encoding="utf-8")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("--tensorboard-dir needs the tensorboard package: "
                                   "pip install tensorboard") from e
            self._tb = SummaryWriter(tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("--wandb-project needs the wandb package: pip install wandb") from e
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=config)

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        if console:
            print(console, file=self.stream, flush=True)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        step = int(record.get("iteration", 0))
        prefix = "valid/" if record.get("split") == "valid" else (
            "test/" if record.get("split") == "test" else "train/")
        numbers = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(prefix + k, v, step)
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_train_line(r: dict[str, Any]) -> str:
    """Megatron-style console line."""
    parts = [f"iteration {r['iteration']:>8d}/{r['train_iters']}",
             f"consumed samples {r['consumed_samples']:>10d}",
             *([f"lm loss {r['lm_loss']:.6e}", f"sop loss {r['sop_loss']:.6e}"]
               if "sop_loss" in r else [f"lm loss {r['loss']:.6e}"]),
             f"lr {r['lr']:.4e}", f"grad norm {r['grad_norm']:.4f}",
             f"skipped {r.get('skipped_iters', 0)}",
             f"tokens/s {r['tokens_per_s']:.0f}",
             f"TFLOP/s/dev {r['tflops_per_device']:.3g}", f"MFU {100 * r['mfu']:.1f}%"]
    if "loss_scale" in r:
        parts.append(f"loss scale {r['loss_scale']:.1f}")
    return " | ".join(parts)
