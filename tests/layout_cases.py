"""Shared pieces of the layout-equivalence tests and the parallel benchmark: tiny GPT/BERT
configs, deterministic global batches split per DP rank, and a training run in one layout."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import pytest
import torch

from megapre.model.config import TransformerConfig
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.train.parallel_model import ParallelModel
from megapre.train.step import StepConfig, TrainStep

VOCAB, SEQ = 61, 8
WORKER_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch.distributed.pipelining",
                  "megapre.train.step"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The single-process reference run on one thread, as each spawned rank runs (the same
    kernels, so the same float rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def preload_worker_modules() -> None:
    """Import DDP's and the pipeline schedules' heavy dependencies (torch._dynamo: seconds per
    process) once in the fork server instead of in every rank of every layout. Takes effect
    when called before the fork server starts (the first run_distributed of the session)."""
    from megapre.parallel import testing

    testing._context().set_forkserver_preload(WORKER_PRELOAD)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int | None = None
    sp: bool = False
    schedule: str | None = None
    cp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def __str__(self) -> str:
        s = f"tp{self.tp}-pp{self.pp}-dp{self.dp}"
        if self.cp > 1:
            s += f"-cp{self.cp}"
        if self.vp:
            s += f"-vp{self.vp}"
        if self.sp:
            s += "-sp"
        if self.schedule:
            s += f"-{self.schedule}"
        return s


def model_config(num_layers: int = 4, hidden: int = 32, heads: int = 4, seq: int = SEQ,
                 vocab: int = VOCAB) -> TransformerConfig:
    return TransformerConfig(num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads,
                             vocab_size=vocab, seq_length=seq, max_position_embeddings=seq,
                             hidden_dropout=0.0, attention_dropout=0.0,
                             make_vocab_size_divisible_by=8)


def global_batch(kind: str, step: int, size: int, seq: int = SEQ,
                 vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """The samples of optimizer step `step` (identical for every layout)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (size, seq + 1), generator=g)
    if kind == "gpt":
        loss_mask = (torch.rand(size, seq, generator=g) > 0.1).float()
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask}
    text = tokens[:, :-1]
    lengths = torch.randint(seq // 2, seq + 1, (size,), generator=g)
    real = (torch.arange(seq)[None] < lengths[:, None]).long()
    loss_mask = ((torch.rand(size, seq, generator=g) < 0.3).long() * real)
    loss_mask[:, 1] = 1  # at least one predicted token per sample
    labels = torch.where(loss_mask.bool(), torch.randint(0, vocab, (size, seq), generator=g),
                         torch.full((size, seq), -1))
    types = (torch.arange(seq)[None] >= lengths[:, None] // 2).long() * real
    return {"text": text * real, "types": types, "labels": labels, "loss_mask": loss_mask,
            "padding_mask": real, "is_random": torch.randint(0, 2, (size,), generator=g)}


def micro_batches(kind: str, step: int, global_size: int, micro: int, dp_rank: int,
                  dp: int, **shape) -> list[dict[str, torch.Tensor]]:
    """This DP rank's share of the step's global batch, in micro-batches."""
    full = global_batch(kind, step, global_size, **shape)
    per = global_size // dp
    mine = {k: v[dp_rank * per:(dp_rank + 1) * per] for k, v in full.items()}
    return [{k: v[i:i + micro] for k, v in mine.items()} for i in range(0, per, micro)]


def train(kind: str, mesh: ParallelMesh, steps: int, micro: int, global_size: int,
          schedule: str | None = None, cfg: TransformerConfig | None = None,
          lr: float = 1e-3, clip: float = 1.0) -> list[tuple[float, float]]:
    """(loss, grad norm) of each step of a fresh model trained in `mesh`'s layout (two global
    batches, alternating, so the loss visibly falls), then (held-out forward-only loss, 0)."""
    cfg = cfg or model_config()
    model = ParallelModel.build(kind, cfg, mesh, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    step = TrainStep(model, opt, StepConfig(micro, global_size, clip_grad=clip,
                                            pipeline_schedule=schedule))
    out = []
    for it in range(steps):
        mbs = micro_batches(kind, it % 2, global_size, micro, mesh.dp_rank, mesh.dp_size,
                            seq=cfg.seq_length, vocab=cfg.vocab_size)
        result = step(iter(mbs))
        out.append((result.loss, result.grad_norm))
    held_out = micro_batches(kind, 99, global_size, micro, mesh.dp_rank, mesh.dp_size,
                             seq=cfg.seq_length, vocab=cfg.vocab_size)
    out.append((step.evaluate(iter(held_out))["loss"], 0.0))  # forward-only, after training
    return out




def assert_same_runs(got: list[tuple[float, float]], ref: list[tuple[float, float]],
                     what: object = None) -> None:
    """Every step's (loss, grad norm) of a layout equals the single-process run's to 1e-5."""
    assert len(got) == len(ref), what
    for (loss, norm), (rl, rn) in zip(got, ref):
        assert loss == pytest.approx(rl, rel=1e-5), what
        assert norm == pytest.approx(rn, rel=1e-5, abs=1e-12), what

def resume_losses(kind: str, cfg: TransformerConfig, mesh: ParallelMesh, root: str, seed: int,
                  save: bool, micro: int, global_size: int) -> list[float]:
    """Two steps from a fresh model then a save to root/kind (save=True), or a load of that save
    (any layout); then the losses of two more steps. Equal lists across layouts show that a
    checkpoint resumes exactly in another layout."""
    from megapre.train.checkpoint import load_checkpoint, save_checkpoint

    model = ParallelModel.build(kind, cfg, mesh, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    step = TrainStep(model, opt, StepConfig(micro, global_size))

    def run(first: int) -> list[float]:
        return [step(iter(micro_batches(kind, it, global_size, micro, mesh.dp_rank,
                                        mesh.dp_size))).loss for it in (first, first + 1)]
    if save:
        run(0)
        save_checkpoint(f"{root}/{kind}", 2, model, opt, mesh, consumed_samples=2 * global_size)
    else:
        assert load_checkpoint(f"{root}/{kind}", model, opt, mesh)["iteration"] == 2
    return run(2)

def layout_mesh(layout: Layout) -> ParallelMesh:
    return ParallelMesh.init(ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                                            virtual_pipeline=layout.vp,
                                            sequence_parallel=layout.sp,
                                            context_parallel=layout.cp), device="cpu")


def layout_worker(rank: int, world: int, layout: Layout, kinds: tuple[str, ...], steps: int,
                  micro: int, global_size: int) -> dict[str, list[tuple[float, float]]]:
    mesh = layout_mesh(layout)
    return {k: train(k, mesh, steps, micro, global_size, layout.schedule) for k in kinds}
