"""What a run reports: model FLOPs per token, throughput, MFU against the device's dense peak,
and the sinks (console, JSONL, TensorBoard, W&B).

FLOPs are *model* FLOPs (recomputation is not counted), Megatron's convention: per token and
layer, 2 x every weight multiply (QKV with grouped-query heads, output projection, the MLP with 2
or 3 matrices), 2 x 2 x s x heads x head_dim for the attention scores and weighted values, plus
the logits; training is 3x the forward (backward = 2x).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from megapre.errors import ConfigError
from megapre.model.config import TransformerConfig

# Dense (no sparsity) peak TFLOP/s per device, by name fragment; bf16/fp16 tensor cores.
GPU_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
                   ("A800", 312.0), ("L40S", 362.0), ("A10", 125.0), ("V100", 125.0))


def flops_per_token(cfg: TransformerConfig, seq_length: int, training: bool = True,
                    predicted_fraction: float = 1.0) -> float:
    """Model FLOPs per token. `predicted_fraction`: the share of positions whose vocabulary
    logits are computed (BERT training: the masked ones, --mask-prob). Shared layers
    (--share-layers-every) still run once per layer, so they cost the same FLOPs."""
    h, hd = cfg.hidden_size, cfg.head_dim
    nh, ng, f = cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    qkv = 2 * h * (nh + 2 * ng) * hd
    attn = 2 * 2 * seq_length * nh * hd
    proj = 2 * nh * hd * h
    mlp = 2 * h * f * (3 if cfg.activation == "swiglu" else 2)
    # a tied factorized table (--embedding-size E) takes the logits at width E
    width = h if cfg.untie_embeddings_and_output_weights else cfg.embedding_dim
    logits = 2 * width * cfg.padded_vocab_size(1) * predicted_fraction
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
    owns the loss (last pipeline stage, TP 0, DP 0) is created with enabled=True.

    The JSONL file opens on `start` (or the first record): a resumed run appends to it, a fresh
    run first moves an old file aside (`rotate`), so two runs never mix in one file."""

    def __init__(self, enabled: bool, metrics_path: str | None = None,
                 tensorboard_dir: str | None = None, wandb_project: str | None = None,
                 wandb_name: str | None = None, config: dict | None = None,
                 stream: TextIO | None = None, wandb_entity: str | None = None,
                 wandb_dir: str | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout  # as of now, not of import

        self.metrics_path = metrics_path
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--tensorboard-dir needs the tensorboard package: "
                                  "pip install tensorboard") from e
            self._tb = SummaryWriter(tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("--wandb-project needs the wandb package: pip install wandb") from e
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=config,
                                     entity=wandb_entity, dir=wandb_dir)

    def start(self, resumed: bool) -> str | None:
        """Open the metrics file: append when `resumed`, else rotate an old one first. Returns
        a line saying where an old file went (None when nothing moved)."""
        if not self.enabled or not self.metrics_path or self._jsonl is not None:
            return None
        os.makedirs(os.path.dirname(os.path.abspath(self.metrics_path)), exist_ok=True)
        moved = None if resumed else rotate(self.metrics_path)
        self._jsonl = open(self.metrics_path, "a", buffering=1, encoding="utf-8")
        if moved is None:
            return None
        return (f"metrics: {self.metrics_path} held an earlier run's records; moved them to "
                f"{moved} (this run starts fresh; a run resumed with --load appends)")

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        if console:
            print(console, file=self.stream, flush=True)
        if self._jsonl is None and self.metrics_path:
            self.start(resumed=True)
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


def rotate(path: str) -> str | None:
    """Rename a non-empty `path` to the first free `path.N` (N = 1, 2, ...); returns the new name
    (None when there was nothing to move). Earlier rotations are never overwritten."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    n = 1
    while os.path.exists(f"{path}.{n}"):
        n += 1
    os.replace(path, f"{path}.{n}")
    return f"{path}.{n}"


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours unbounded); '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_train_line(r: dict[str, Any]) -> str:
    """Megatron-style console line: progress and time first, then speed, then the numbers."""
    width = len(str(r["train_iters"]))
    parts = [f"iteration {r['iteration']:>{width}d}/{r['train_iters']}"]
    if "elapsed_s" in r:
        parts += [f"elapsed {format_duration(r['elapsed_s'])}",
                  f"ETA {format_duration(r.get('eta_s', float('nan')))}"]
    if "step_time_s" in r:
        parts.append(f"{1000 * r['step_time_s']:.1f} ms/iter")
    parts += [f"tokens/s {r['tokens_per_s']:.0f}",
              f"TFLOP/s/dev {r['tflops_per_device']:.3g}", f"MFU {100 * r['mfu']:.1f}%",
              *([f"lm loss {r['lm_loss']:.6e}", f"sop loss {r['sop_loss']:.6e}"]
                if "sop_loss" in r else [f"lm loss {r['loss']:.6e}"]),
              f"lr {r['lr']:.4e}", f"grad norm {r['grad_norm']:.4f}",
              f"consumed samples {r['consumed_samples']}",
              f"skipped {r.get('skipped_iters', 0)}"]
    if "loss_scale" in r:
        parts.append(f"loss scale {r['loss_scale']:.1f}")
    if "params_norm" in r:
        parts.append(f"params norm {r['params_norm']:.3f}")
    if "num_zeros_in_grad" in r:
        parts.append(f"num zeros {r['num_zeros_in_grad']}")
    return " | ".join(parts)


def eval_record(iteration: int, split: str, loss: float, parts: dict[str, float]) -> dict[str, Any]:
    """One evaluation's record. Perplexity is exp(LM loss): BERT's total loss adds the
    sentence-order loss, which is no language-model perplexity (megapre.evaluate agrees)."""
    record = {"iteration": iteration, "split": split, "loss": loss,
              **{k.replace(" ", "_"): v for k, v in parts.items()}}
    record["ppl"] = math.exp(min(record.get("lm_loss", loss), 50.0))
    return record


def format_eval_line(r: dict[str, Any]) -> str:
    losses = ([f"lm loss {r['lm_loss']:.6e}", f"sop loss {r['sop_loss']:.6e}"]
              if "sop_loss" in r else [f"lm loss {r['loss']:.6e}"])
    return " | ".join([f"{r['split']} at iteration {r['iteration']}", *losses,
                       f"ppl {r['ppl']:.3f}"])


def _summary_value(key: str, value: Any) -> str:
    if isinstance(value, float) and key.endswith("_s"):
        return f"{format_duration(value)} ({value:.1f} s)"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.4e}"
    return "-" if value is None else str(value)


def format_summary(summary: dict[str, Any], title: str = "run summary") -> str:
    """The end-of-run summary as aligned `key  value` lines (the JSON is in the metrics file)."""
    width = max((len(k) for k in summary), default=0)
    lines = [f"{title}:"]
    lines += [f"  {k:<{width}}  {_summary_value(k, v)}" for k, v in summary.items()]
    return "\n".join(lines)


SUMMARY_ORDER = ("exit_reason", "started_from", "start_iteration", "iteration", "consumed_samples",
                 "train_loss", "valid_loss", "test_loss", "skipped_iters", "elapsed_s")


def ordered_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's keys in reading order (known keys first, then the rest sorted)."""
    known = {k: summary[k] for k in SUMMARY_ORDER if k in summary}
    return {**known, **{k: summary[k] for k in sorted(summary) if k not in known}}


def summary_path(metrics_path: str) -> str:
    """Where the run's summary JSON goes: beside the metrics file (metrics.summary.json)."""
    return os.path.splitext(metrics_path)[0] + ".summary.json"


def write_summary(metrics_path: str, summary: dict[str, Any]) -> str:
    """Write the summary JSON beside the metrics file (temporary file, then rename)."""
    path = summary_path(metrics_path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path
