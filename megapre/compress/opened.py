"""The float model a quantize run works on, opened from a pretraining checkpoint or a fine-tuned
one (a task head; LoRA adapters are merged into their base weights first, since the int8 layers
replace the layers that hold them), in one process, with what the quantized checkpoint must
carry over (iteration, the fine-tuning task state)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megapre.errors import ConfigError


@dataclass
class Opened:
    path: Path
    cfg: Any  # PretrainConfig or FinetuneConfig
    runtime: Any  # megapre.train.runtime.Runtime
    iteration: int
    extra: dict  # meta.json extra of the quantized checkpoint
    fine_tuned: bool


def is_fine_tuned(path: Path) -> bool:
    from megapre.train.checkpoint import read_config

    return isinstance((read_config(path) or {}).get("task"), dict)


def single_process(cfg, device: str) -> None:
    """Layout TP1/PP1 on `device`, fp32: the quantize run's, whatever the training run's."""
    p = cfg.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = 1
    p.context_parallel_size = 1
    p.even_pipeline()
    p.sequence_parallel = False
    p.num_distributed_optimizer_instances = 1
    cfg.train.device = device
    cfg.train.bf16 = cfg.train.fp16 = False


def refuse_quantized(cfg, load: str) -> None:
    if cfg.quantization is not None:
        raise ConfigError(f"--load {load} is already quantized "
                          f"({cfg.quantization.get('method')}); quantize the float checkpoint")


def open_pretrained(path: Path, load: str, device: str) -> Opened:
    from megapre.inference import checkpoint_io
    from megapre.train.runtime import build_runtime

    cfg = checkpoint_io.saved_config(path)
    refuse_quantized(cfg, load)
    single_process(cfg, device)
    rt = build_runtime(cfg)
    try:
        info = checkpoint_io.load_weights(path, rt)
    except BaseException:
        rt.close()
        raise
    return Opened(path, cfg, rt, int(info["iteration"]), {"quantized_from": str(path)}, False)


def open_task(path: Path, load: str, device: str) -> Opened:
    from megapre.model.lora import merge_lora
    from megapre.train.finetune import open_finetuned

    def adjust(cfg) -> None:
        refuse_quantized(cfg, load)
        single_process(cfg, device)
        cfg.train.global_batch_size = None

    ft = open_finetuned(path, adjust)
    state = dict(ft.task_state)
    if sum(merge_lora(m) for m in ft.runtime.model.models):
        ft.cfg.task.lora_rank = None
        state.update(lora=None, base_fingerprint=None, merged_from=str(path))
    return Opened(path, ft.cfg, ft.runtime, ft.iteration,
                  {"task": state, "quantized_from": str(path)}, True)
