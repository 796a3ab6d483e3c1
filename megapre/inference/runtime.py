"""The pieces a trained model needs at inference: tokenizer, process mesh, the model in this
job's layout. Same construction as the Trainer's (so weights, names and loss normalization are
the training run's), without optimizer, training data or logging.

The inference layout is chosen by the command line, not by the checkpoint: checkpoints load
under any TP/PP, and inference never uses virtual pipeline stages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megapre.data.tokenizers import Tokenizer, build_tokenizer
from megapre.model.config import TransformerConfig
from megapre.parallel import ParallelConfig, ParallelMesh, set_random_seed
from megapre.parallel import layout
from megapre.parallel.mesh import resolve_device
from megapre.parallel.random import RNGTracker
from megapre.train.args import PretrainConfig
from megapre.train.parallel_model import ParallelModel


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


def build_runtime(cfg: PretrainConfig) -> Runtime:
    """Tokenizer, mesh (joins torchrun's process group) and a freshly initialized model."""
    p = cfg.parallel
    p.num_layers_per_virtual_pipeline_stage = None
    tokenizer = build_tokenizer(cfg.tokenizer_config())
    layout.check_parallel_sizes(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    layout.data_parallel_size(int(os.environ.get("WORLD_SIZE", "1")),
                              p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    model_cfg = cfg.transformer_config(tokenizer.vocab_size)
    model_cfg.validate(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, None,
                       p.sequence_parallel)
    device = resolve_device(cfg.train.device)
    mesh = ParallelMesh.init(ParallelConfig(
        tensor_parallel=p.tensor_model_parallel_size,
        pipeline_parallel=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        timeout_s=p.distributed_timeout_minutes * 60), device)
    tracker = set_random_seed(cfg.train.seed, mesh)
    model = ParallelModel.build(cfg.model.model, model_cfg, mesh, seed=cfg.train.seed,
                                tracker=tracker, add_binary_head=cfg.model.bert_binary_head)
    return Runtime(cfg, tokenizer, model_cfg, mesh, model, tracker)
