"""The pieces every program that runs a model builds first: tokenizer, process mesh, RNG tracker
and the model in this job's layout. The Trainer adds optimizer, data and logging on top;
evaluation and generation use it as is, so weights, names and loss normalization are the
training run's.

An inference layout is chosen by the command line, not by the checkpoint: checkpoints load under
any TP/PP/CP, and inference never uses virtual pipeline stages. Context parallelism is a
pretraining layout (the training step splits its micro-batches); other programs refuse it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from megapre.data.tokenizers import Tokenizer, build_tokenizer
from megapre.errors import ConfigError
from megapre.model import init
from megapre.model.config import TransformerConfig
from megapre.parallel import ParallelConfig, ParallelMesh, layout, set_random_seed
from megapre.parallel.mesh import resolve_device
from megapre.parallel.random import RNGTracker

from .args import PretrainConfig
from .parallel_model import ParallelModel


@dataclass
class Runtime:
    cfg: PretrainConfig
    tokenizer: Tokenizer
    model_cfg: TransformerConfig
    mesh: ParallelMesh
    model: ParallelModel
    tracker: RNGTracker

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    def close(self) -> None:
        self.mesh.destroy()


def build_runtime(cfg: PretrainConfig, *, tokenizer: Tokenizer | None = None,
                  virtual_pipeline: int | None = None,
                  recompute_granularity: str | None = None,
                  adapter: Callable[[TransformerConfig, ParallelMesh], Any] | None = None,
                  context_parallel: bool = False) -> Runtime:
    """Tokenizer (unless given), mesh (joins torchrun's process group) and a freshly initialized
    model in the layout of `cfg` (with `virtual_pipeline` model chunks per pipeline rank).
    `adapter(model_cfg, mesh)` builds another model kind's ModelAdapter (fine-tuning's
    TaskAdapter); the default is the pretraining model of `cfg.model.model`. Only a caller that
    feeds the training step (`context_parallel=True`) may run --context-parallel-size > 1."""
    p = cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if cp != 1 and not (context_parallel and adapter is None):
        raise ConfigError(f"--context-parallel-size {cp} is for pretraining (megapre-pretrain); "
                          "run this program with --context-parallel-size 1")
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer_config())
    layout.check_parallel_sizes(tp, pp, virtual_pipeline)
    layout.check_context_parallel(cp, cfg.model.seq_length, cfg.model.attention_dropout)
    layout.data_parallel_size(int(os.environ.get("WORLD_SIZE", "1")), tp, pp, cp)
    model_cfg = cfg.transformer_config(tokenizer.vocab_size)
    model_cfg.validate(tp, pp, virtual_pipeline, p.sequence_parallel, p.stage_split())
    device = resolve_device(cfg.train.device)
    if cfg.train.deterministic_mode:
        _deterministic(device)
    mesh = ParallelMesh.init(ParallelConfig(
        tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=virtual_pipeline,
        sequence_parallel=p.sequence_parallel, context_parallel=cp,
        timeout_s=p.distributed_timeout_minutes * 60, tp_pp_dp_order=p.use_tp_pp_dp_mapping,
        stage_split=p.stage_split(),
        optimizer_instances=p.num_distributed_optimizer_instances),
        device)
    tracker = set_random_seed(cfg.train.seed, mesh)
    # the distributed optimizer reduces gradients itself (no DDP wrapper then)
    wrap = {"ddp": not p.use_distributed_optimizer}
    if p.ddp_bucket_size is not None:
        wrap["ddp_bucket_cap_mb"] = p.ddp_bucket_size * 4 / 2**20  # fp32 elements
    if cfg.quantization is not None:
        wrap["ddp"] = False  # int8 models only run forward: nothing for DDP to reduce
    # a quantized checkpoint holds every weight: drawing the float init would be wasted
    with init.skipped() if cfg.quantization is not None else contextlib.nullcontext():
        if adapter is not None:
            model = ParallelModel.from_adapter(adapter(model_cfg, mesh), seed=cfg.train.seed,
                                               tracker=tracker,
                                               recompute_granularity=recompute_granularity, **wrap)
        else:
            model = ParallelModel.build(cfg.model.model, model_cfg, mesh, seed=cfg.train.seed,
                                        tracker=tracker,
                                        recompute_granularity=recompute_granularity,
                                        add_binary_head=cfg.model.bert_binary_head, **wrap)
    if cfg.quantization is not None:
        _quantized_layers(cfg.quantization, model, mesh)
    return Runtime(cfg, tokenizer, model_cfg, mesh, model, tracker)


def _quantized_layers(record: dict, model: ParallelModel, mesh: ParallelMesh) -> None:
    """A quantized checkpoint's run: give the model its int8 layers (empty; the checkpoint load
    fills them) so the saved int8 weights and scales fit (megapre.compress)."""
    from megapre.compress.structure import build_recorded

    build_recorded(record, model.models, mesh)

def _deterministic(device) -> None:
    """--deterministic-mode: only deterministic kernels (torch raises where an op has none);
    cuBLAS needs a fixed workspace for that, set unless the user chose one."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
