"""The model as this rank holds it: its pipeline chunks (GPT or BERT pieces), each wrapped for
data parallelism, plus the tied-embedding bookkeeping that crosses pipeline stages.

    model = ParallelModel.build("gpt", cfg, mesh, seed=1234)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    step = TrainStep(model, optimizer, StepConfig(micro_batch_size=4, global_batch_size=64))
"""
from __future__ import annotations

import torch
from torch import nn

from megapre.model.config import TransformerConfig
from megapre.parallel.data_parallel import unwrap, wrap_data_parallel
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.pipeline import ChunkSpec
from megapre.parallel.random import RNGTracker

from .stages import ModelAdapter


class ParallelModel(nn.Module):
    """This rank's chunks (`self.chunks[i]` runs virtual stage `self.specs[i].stage_index`),
    DDP-wrapped when DP > 1. `models` are the unwrapped GPTModel / BertModel pieces, whose
    parameter names (`decoder.layers.7.mlp.fc1.weight`: global layer numbers) are the same in
    every layout and are the checkpoint's names."""

    def __init__(self, adapter: ModelAdapter, specs: list[ChunkSpec], chunks: list[nn.Module]
                 ) -> None:
        super().__init__()
        self.adapter = adapter
        self.mesh = adapter.mesh
        self.specs = specs
        self.chunks = nn.ModuleList(chunks)

    @classmethod
    def build(cls, kind: str, cfg: TransformerConfig, mesh: ParallelMesh, *, seed: int = 1234,
              tracker: RNGTracker | None = None, recompute_granularity: str | None = None,
              label_smoothing: float = 0.0, add_binary_head: bool = True,
              ddp_bucket_cap_mb: float = 25.0, ddp: bool = True) -> "ParallelModel":
        adapter = ModelAdapter(kind, cfg, mesh, add_binary_head=add_binary_head)
        return cls.from_adapter(adapter, seed=seed, tracker=tracker,
                                recompute_granularity=recompute_granularity,
                                label_smoothing=label_smoothing,
                                ddp_bucket_cap_mb=ddp_bucket_cap_mb, ddp=ddp)

    @classmethod
    def from_adapter(cls, adapter, *, seed: int = 1234, tracker: RNGTracker | None = None,
                     recompute_granularity: str | None = None, label_smoothing: float = 0.0,
                     ddp_bucket_cap_mb: float = 25.0, ddp: bool = True) -> "ParallelModel":
        """This rank's chunks as `adapter` (a pretraining ModelAdapter or a fine-tuning
        TaskAdapter) builds them. `ddp=False` leaves them unwrapped: the distributed optimizer
        then does the DP gradient reduction."""
        mesh = adapter.mesh
        specs = adapter.chunks()
        chunks = [adapter.build(s, seed=seed, tracker=tracker,
                                recompute_granularity=recompute_granularity,
                                label_smoothing=label_smoothing) for s in specs]
        if ddp:
            chunks = [wrap_data_parallel(c, mesh, bucket_cap_mb=ddp_bucket_cap_mb) for c in chunks]
        return cls(adapter, specs, chunks)

    @property
    def models(self) -> list[nn.Module]:
        """The GPTModel / BertModel pieces, without DDP wrappers."""
        return [unwrap(c).model for c in self.chunks]

    def tied_embedding_weight(self) -> torch.Tensor | None:
        """The word table shared with a copy on another pipeline stage (first or last chunk of
        this rank), or None when there is no cross-stage tie here."""
        if self.mesh.pp_size == 1 or not self.adapter.ties_embeddings:
            return None
        for spec, model in zip(self.specs, self.models):
            if spec.is_first or spec.is_last:
                return model.shared_embedding_weight()
        return None

    def tied_copies(self) -> list[torch.Tensor]:
        """Parameters that duplicate another stage's (the last stage's word-table copy): left out
        of the global grad norm so it is counted once."""
        if self.mesh.pp_size == 1 or not self.adapter.ties_embeddings:
            return []
        for spec, model in zip(self.specs, self.models):
            if spec.is_last and not spec.is_first:
                w = model.shared_embedding_weight()
                return [w] if w is not None else []
        return []

    def forward(self, *args, **kwargs):  # pragma: no cover - the step drives the chunks
        raise RuntimeError("ParallelModel is run by TrainStep (pipeline schedule or gradient "
                           "accumulation); call a chunk directly for inference")
