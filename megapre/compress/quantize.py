"""Post-training int8 quantization of a megapre checkpoint (`megapre-compress quantize`).

    float checkpoint --load -> [calibrate on --calib-data] -> [smooth (smoothquant)] -> int8
    layers -> quantized checkpoint --save

Methods (--method): `weight-int8` (int8 weights, per-output-channel scales, float activations:
the decode case), `w8a8` (also per-token dynamic int8 activations: int8 GEMMs), `smoothquant`
(w8a8 after SmoothQuant's smoothing, which needs --calib-data). With --calib-data every method
also reports the relative error of its logits against the float model's on those samples.

A fine-tuned checkpoint (task head; LoRA adapters merged first) quantizes with weight-int8 or
w8a8; its head stays floating point and megapre.evaluate --task-data scores the result.

The quantized checkpoint is a normal megapre checkpoint (written atomically by the training
checkpoint writer) whose run config records the quantization, so megapre.generate and
megapre.evaluate build the int8 layers and load it in any TP/PP layout. Quantization itself runs
in one process (no torchrun): it is a few seconds of work next to the training that made the
checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megapre.errors import ConfigError

from .config import QuantConfig
from .structure import block_linears


@dataclass
class QuantizeJob:
    """The quantize command's inputs."""

    load: str
    save: str
    quant: QuantConfig
    calib_data: str | None = None
    calib_samples: int = 16
    device: str = "cpu"
    allow_tokenizer_mismatch: bool = False


def check_job(job: QuantizeJob) -> None:
    """Refuse what cannot work before anything is read or written."""
    job.quant.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConfigError("quantize runs in one process: start it without torchrun (the "
                          "quantized checkpoint then loads in any TP/PP layout)")
    if job.quant.method == "smoothquant" and not job.calib_data:
        raise ConfigError("--method smoothquant needs --calib-data PREFIX (activation maxima "
                          "set the smoothing factors)")
    if isinstance(job.calib_samples, bool) or not isinstance(job.calib_samples, int) \
            or job.calib_samples < 1:
        raise ConfigError(f"--calib-samples {job.calib_samples!r} must be a positive integer")
    save = Path(job.save)
    if save.resolve() == Path(job.load).resolve():
        raise ConfigError("--save must differ from --load (the float checkpoint stays intact)")
    if save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise ConfigError(f"--save {job.save} exists and is not empty; give a new directory")


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the block linears' weights, scales and biases."""
    total = 0
    for name in block_linears(model) + _int8_names(model):
        total += sum(t.numel() * t.element_size()
                     for t in model.get_submodule(name).parameters(recurse=False))
    return total


def _int8_names(model: nn.Module) -> list[str]:
    from .int8_layers import INT8_LAYERS

    return [n for n, m in model.named_modules() if isinstance(m, INT8_LAYERS)]


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model.gathered_logits(model(input_ids=ids[i:i + 4].to(device))).float()
                      for i in range(0, ids.shape[0], 4)])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius)."""
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def _open(job: QuantizeJob):
    """The float model of job.load, refusing what its kind cannot do."""
    from megapre.inference import checkpoint_io

    from .opened import is_fine_tuned, open_pretrained, open_task

    path = checkpoint_io.resolve(job.load)
    if is_fine_tuned(path):
        if job.calib_data or job.quant.method == "smoothquant" or job.quant.quantize_lm_head:
            raise ConfigError(f"--load {job.load} is a fine-tuned (task head) checkpoint: "
                              "quantize it with --method weight-int8 or w8a8, without "
                              "--calib-data and --quantize-lm-head (they run the language model)")
        return open_task(path, job.load, job.device)
    opened = open_pretrained(path, job.load, job.device)
    if opened.cfg.model.model != "gpt" and (job.calib_data or job.quant.quantize_lm_head):
        opened.runtime.close()
        raise ConfigError("--calib-data and --quantize-lm-head are for GPT checkpoints; quantize "
                          "this BERT checkpoint with --method weight-int8 or w8a8 alone")
    return opened


def quantize_checkpoint(job: QuantizeJob) -> dict:
    """Quantize job.load into job.save; returns a summary (method, layers, sizes, errors)."""
    from megapre.inference import checkpoint_io
    from megapre.train.checkpoint import save_checkpoint

    from .calib import activation_absmax, calibration_ids
    from .smoothquant import smooth_model
    from .structure import quantize_model

    check_job(job)
    opened = _open(job)
    rt, cfg = opened.runtime, opened.cfg
    try:
        checkpoint_io.check_tokenizer(opened.path, rt.tokenizer, job.allow_tokenizer_mismatch)
        ids = None
        if job.calib_data:
            ids = calibration_ids(job.calib_data, rt.tokenizer, cfg.model.seq_length,
                                  job.calib_samples, job.allow_tokenizer_mismatch)
        model = rt.model.models[0]
        model.eval()
        summary = {"method": job.quant.method, "load": str(opened.path), "save": job.save,
                   "iteration": opened.iteration, "fine_tuned": opened.fine_tuned,
                   "linear_bytes_float": linear_bytes(model)}
        reference = _logits(model, ids) if ids is not None else None
        if job.quant.method == "smoothquant":
            summary["smoothed_layers"] = smooth_model(model, activation_absmax(model, ids),
                                                      job.quant.alpha)
            summary["alpha"] = job.quant.alpha
        summary["quantized_layers"] = quantize_model(model, job.quant, rt.mesh)
        summary["linear_bytes_int8"] = linear_bytes(model)
        summary["quantize_lm_head"] = job.quant.quantize_lm_head
        if reference is not None:
            summary["calib_samples"] = job.calib_samples
            summary["logits_rel_error"] = relative_error(_logits(model, ids), reference)
        cfg.quantization = job.quant.record()
        save_checkpoint(job.save, opened.iteration, rt.model, None, rt.mesh,
                        config=cfg.to_dict(), tracker=rt.tracker, extra=opened.extra,
                        tokenizer=rt.tokenizer.describe())
    finally:
        rt.close()
    return summary
