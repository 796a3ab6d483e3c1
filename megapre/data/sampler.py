"""Which samples each data-parallel rank reads, resumable at any step.

The dataset is already shuffled (GPTDataset's shuffle index, the blend), so the global order is
simply 0, 1, 2, ... and a global batch g is samples [g * G, (g + 1) * G), G = global batch size
= micro * dp * accumulation steps. Within it, micro step m is the next micro * dp samples and rank r
takes the r-th block of `micro` of them (Megatron's pretraining sampler layout). Every position is
a pure function of the sample number, so starting at `consumed_samples` (saved in the checkpoint)
replays exactly the batches the uninterrupted run would have read next.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from megapre.data.worker_signals import ignore_stop_signals


@dataclass(frozen=True)
class BatchLayout:
    """Batch sizes of a run, validated: global = micro * data_parallel_size * accumulation."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "data_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} must be a multiple of --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {self.data_parallel_size} = {per_step} "
                f"(nearest valid: {', '.join(map(str, _nearest_multiples(self.global_batch_size, per_step)))})"
            )

    @property
    def samples_per_micro_step(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // self.samples_per_micro_step


def _nearest_multiples(value: int, unit: int) -> list[int]:
    below, above = value // unit * unit, (value // unit + 1) * unit
    return [m for m in (below, above) if m > 0]


class PretrainingSampler:
    """Batch sampler for one data-parallel rank: yields lists of `micro_batch_size` sample ids.

    Use as `DataLoader(dataset, batch_sampler=PretrainingSampler(...))`. Covers whole global
    batches only: a last incomplete global batch is dropped (every rank would otherwise disagree
    on how many micro steps the last iteration has).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 global_batch_size: int, data_parallel_rank: int, data_parallel_size: int) -> None:
        self.layout = BatchLayout(micro_batch_size, global_batch_size, data_parallel_size)
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        if total_samples < 0:
            raise ValueError(f"total_samples must be >= 0, got {total_samples}")
        self.total_samples = int(total_samples)
        self.end = self.total_samples // global_batch_size * global_batch_size
        step = self.layout.samples_per_micro_step
        if consumed_samples < 0 or consumed_samples % step:
            raise ValueError(
                f"consumed_samples {consumed_samples} must be a non-negative multiple of micro batch x "
                f"data-parallel size = {step} (it counts samples of whole micro steps)"
            )
        if consumed_samples > self.end:
            raise ValueError(
                f"consumed_samples {consumed_samples} is past the {self.end} samples this dataset provides "
                f"in whole global batches of {global_batch_size} ({self.total_samples} samples); the "
                "checkpoint belongs to a longer run or a different dataset"
            )
        self.consumed_samples = int(consumed_samples)
        self.rank = int(data_parallel_rank)

    def __len__(self) -> int:
        """Micro batches this rank will yield."""
        return (self.end - self.consumed_samples) // self.layout.samples_per_micro_step

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.layout.micro_batch_size
        step = self.layout.samples_per_micro_step
        for start in range(self.consumed_samples, self.end, step):
            first = start + self.rank * micro
            yield list(range(first, first + micro))


def build_data_loader(dataset: Any, consumed_samples: int, micro_batch_size: int, global_batch_size: int,
                      data_parallel_rank: int, data_parallel_size: int, num_workers: int = 2,
                      pin_memory: bool = True) -> Any:
    """torch DataLoader over `dataset` for one data-parallel rank, starting at consumed_samples."""
    import torch

    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, global_batch_size,
                                 data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # its own generator: iterating must not draw a seed from the global one (exact resume)
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )

