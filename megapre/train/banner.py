"""The start-up banner of a pretraining run: what is about to run, in a few aligned lines, printed
as soon as each part is known (the config at once, the model when built, the data when its
indices are ready), so a wrong layout, tokenizer or path shows in the first seconds."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from megapre.data.notify import is_main_process
from megapre.data.tokenizers import build_tokenizer
from megapre.parallel import layout

from .args import PretrainConfig, RunPlan, check_logging, validate
from .checkpoint_names import looks_like_checkpoint


def emit(lines: list[str]) -> None:
    """Banner lines, from global rank 0 only (before and after the process group exists)."""
    if is_main_process():
        for line in lines:
            print(f"[megapre] {line}", flush=True)


def plan_run(cfg: PretrainConfig, world_size: int) -> tuple[Any, RunPlan]:
    """Everything that can be checked before torch is imported (seconds on a busy node): the
    tokenizer, the config against the world size, the logging packages; then the config's banner
    lines. Returns (tokenizer, plan)."""
    tokenizer = build_tokenizer(cfg.tokenizer_config())
    plan = validate(cfg, world_size, tokenizer.vocab_size)
    check_logging(plan.config.log)
    emit(config_lines(plan, world_size, tokenizer))
    return tokenizer, plan


def _count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _lines(rows: list[tuple[str, str]]) -> list[str]:
    return [f"{key:<12}{value}" for key, value in rows]


def config_lines(plan: RunPlan, world_size: int, tokenizer: Any) -> list[str]:
    """What the config alone says: model, layout, tokenizer, precision, paths."""
    cfg = plan.config
    m, p, t = cfg.model, cfg.parallel, cfg.train
    c, log = cfg.checkpoint, cfg.log
    precision = "bf16 autocast" if t.bf16 else ("fp16 autocast + loss scaling" if t.fp16 else "fp32")
    fingerprint = tokenizer.fingerprint()[:12] if hasattr(tokenizer, "fingerprint") else "-"
    save = c.save or "- (no --save: a stop signal or the end of the run saves nothing)"
    if c.save and c.save_interval:
        save += f" (every {c.save_interval} iterations and at the end)"
    return _lines([
        ("model", f"{m.model}, {m.num_layers} layers, hidden {m.hidden_size}, "
                  f"{m.num_attention_heads} heads, seq {m.seq_length}"),
        ("layout", f"world {world_size} = TP {p.tensor_model_parallel_size} x "
                   + (f"CP {p.context_parallel_size} x " if p.context_parallel_size > 1 else "")
                   + f"PP "
                   f"{p.pipeline_model_parallel_size} x DP {plan.dp_size}; VP "
                   f"{plan.virtual_pipeline or '-'}; schedule {plan.pipeline_schedule or '-'}; "
                   + _uneven_stages(plan) +
                   f"global batch {plan.global_batch_size} = micro {t.micro_batch_size} x "
                   f"{plan.num_microbatches} micro-batches x DP {plan.dp_size}"),
        ("training", f"{t.train_iters} iterations, {plan.global_batch_size * m.seq_length:,} "
                     f"tokens per iteration, {precision}"),
        ("tokenizer", f"{getattr(tokenizer, 'name', type(tokenizer).__name__)}, vocab "
                      f"{tokenizer.vocab_size}, fingerprint {fingerprint}"),
        ("save", save),
        ("load", _load_text(c.load)),
        ("metrics", log.metrics_path or "- (console only; --metrics-path FILE keeps them)"),
    ])


def _uneven_stages(plan: RunPlan) -> str:
    """'layers per stage 1/3/3/1; ' under Megatron's uneven pipeline split, else ''."""
    p = plan.config.parallel
    split = p.stage_split()
    if split == layout.EVEN:
        return ""
    counts = layout.chunk_layers(plan.config.model.num_layers, p.pipeline_model_parallel_size,
                                 plan.virtual_pipeline, split)
    per_stage = "/".join("+".join(map(str, chunks)) for chunks in counts)
    return f"layers per stage {per_stage}; "


def _load_text(load: str | None) -> str:
    """--load, flagged when it holds no checkpoint (a typo would otherwise restart the run)."""
    if not load:
        return "-"
    if looks_like_checkpoint(load):
        return load
    why = "no such directory" if not os.path.isdir(load) else "no checkpoint in it"
    return f"{load} (WARNING: {why}; this run starts from scratch)"


def model_lines(total: int, on_rank: int, device: Any, backend: str) -> list[str]:
    return _lines([("parameters", f"{_count(total)} total, {_count(on_rank)} on this rank"),
                   ("device", f"{device}, attention backend {backend}")])


def split_size(dataset: Any) -> tuple[int, int] | None:
    """(documents, tokens) of a split: its documents' range of each indexed dataset it reads
    (blends summed); None when the dataset does not expose them."""
    parts = getattr(dataset, "datasets", None)
    if parts is not None:
        sizes = [split_size(d) for d in parts]
        if any(s is None for s in sizes):
            return None
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    indexed, docs = getattr(dataset, "indexed", None), getattr(dataset, "document_range", None)
    if indexed is None or docs is None:
        return None
    di = np.asarray(indexed.document_indices)
    lengths = np.asarray(indexed.sequence_lengths)
    return int(docs[1] - docs[0]), int(lengths[di[docs[0]]:di[docs[1]]].sum(dtype=np.int64))


def data_lines(splits: Any, tokens_per_run: int) -> list[str]:
    """Documents and tokens of each split; epochs of the training split over the whole run."""
    rows = []
    for name in ("train", "valid", "test"):
        ds = getattr(splits, name, None)
        if ds is None:
            rows.append((name, "- (off)"))
            continue
        size = split_size(ds)
        if size is None:
            rows.append((name, f"{len(ds):,} samples"))
            continue
        docs, tokens = size
        text = f"{docs:,} documents, {tokens:,} tokens"
        if name == "train" and tokens:
            text += f", {tokens_per_run / tokens:.2f} epochs over the run"
        rows.append((name, text))
    return _lines(rows)
