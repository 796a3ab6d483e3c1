"""Batches of an encoded task for fine-tuning: shuffled per epoch, resumable at any step, split over
data-parallel ranks, and padded only to the longest member of each micro-batch.

Every position is a pure function of (seed, epoch, step): the order of epoch e is a permutation drawn
from (seed, e) alone, global batch g of that epoch is order[g*G:(g+1)*G], and data-parallel rank r
takes the r-th contiguous G/dp of it, cut into micro-batches. So `train(k)` replays exactly what an
uninterrupted run reads at step k, on any number of ranks, without touching steps 0..k-1.

Sentences are short and of very different lengths, so padding to `--seq-length` would mostly compute
padding. Each micro-batch is padded to its longest member instead; `bucket_by_length` also sorts the
examples of every 50 global batches by length before cutting them (and shuffles the resulting global
batches), so a micro-batch holds examples of similar length. Pipeline parallelism needs one shape for
every micro-batch: `pad_to` pads all of them to `--seq-length`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from megapre.data.tasks import EncodedTask
from megapre.errors import ConfigError

BUCKET_GLOBAL_BATCHES = 50  # global batches sorted together when bucketing by length


def collate(samples: Sequence[dict[str, Any]], pad_id: int, pad_to: int | None = None,
            pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded tensors of `samples` ({"tokens", "types", "label", "weight"}, optional "index"):
    tokens/types/padding_mask (1 = real token) [b, L] long, lengths [b] long, labels [b] long (float32
    when the labels are floats: regression), weight [b] float32, index [b] long when given.
    L is the longest sample rounded up to a multiple of `pad_multiple` (sequence parallelism splits
    the sequence over TP), or exactly `pad_to`."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = np.fromiter((s["tokens"].size for s in samples), dtype=np.int64, count=len(samples))
    longest = int(lengths.max())
    if pad_to is not None and longest > pad_to:
        raise ConfigError(f"a sample of {longest} tokens does not fit the padded length {pad_to} (--seq-length); "
                          "encode the task with the same --seq-length")
    width = -(-longest // pad_multiple) * pad_multiple if pad_to is None else pad_to
    tokens = np.full((len(samples), width), pad_id, dtype=np.int64)
    types = np.zeros((len(samples), width), dtype=np.int64)
    for row, s in enumerate(samples):
        tokens[row, : lengths[row]] = s["tokens"]
        types[row, : lengths[row]] = s["types"]
    labels = np.asarray([s["label"] for s in samples])
    labels = labels.astype(np.float32 if np.issubdtype(labels.dtype, np.floating) else np.int64)
    out = {
        "tokens": torch.from_numpy(tokens),
        "types": torch.from_numpy(types),
        "padding_mask": torch.from_numpy((np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)),
        "lengths": torch.from_numpy(lengths),
        "labels": torch.from_numpy(labels),
        "weight": torch.tensor([float(s["weight"]) for s in samples], dtype=torch.float32),
    }
    if all("index" in s for s in samples):
        out["index"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    return out


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes and shuffling of one data-parallel rank: global = micro * dp * accumulation."""

    micro_batch_size: int
    global_batch_size: int
    dp_rank: int
    dp_size: int
    seed: int
    bucket_by_length: bool = False
    pad_to: int | None = None  # pipeline parallelism: every micro-batch padded to --seq-length
    pad_multiple: int = 1  # sequence parallelism: padded lengths divisible by the TP size

    def __post_init__(self) -> None:
        for name, flag in (("micro_batch_size", "--micro-batch-size"), ("global_batch_size", "--global-batch-size"),
                           ("dp_size", "data-parallel size")):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ConfigError(f"data-parallel rank {self.dp_rank} is outside [0, {self.dp_size})")
        if self.seed < 0:
            raise ConfigError(f"--seed {self.seed}: must be >= 0")
        if self.pad_to is not None and self.pad_to < 1:
            raise ConfigError(f"padded length {self.pad_to} (--seq-length) must be positive")
        per_step = self.micro_batch_size * self.dp_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} must be a multiple of --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {self.dp_size} = {per_step}"
            )

    @property
    def per_rank(self) -> int:
        """Examples of one global batch that this rank computes."""
        return self.global_batch_size // self.dp_size

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per global batch on each rank."""
        return self.per_rank // self.micro_batch_size


class TaskBatches:
    """Training and evaluation micro-batches of one data-parallel rank over an `EncodedTask`."""

    def __init__(self, data: EncodedTask, plan: BatchPlan, pad_id: int) -> None:
        self.data, self.plan, self.pad_id = data, plan, int(pad_id)
        # Whole global batches only: the remainder of each epoch's shuffle is dropped (train() raises if 0).
        self.steps_per_epoch = len(data) // plan.global_batch_size
        self._order: tuple[int, np.ndarray] | None = None
        self._tokens = {"train": [0, 0], "eval": [0, 0]}  # [real tokens, computed tokens] yielded

    # ------------------------------------------------------------------------------------- order
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Permutation of example indices for `epoch`, from (seed, epoch) only; its first
        steps_per_epoch * global_batch_size entries are the epoch's global batches in order."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        n = len(self.data)
        order = np.random.default_rng([self.plan.seed, epoch]).permutation(n)
        if self.plan.bucket_by_length and self.steps_per_epoch:
            order = self._bucketed(order, np.random.default_rng([self.plan.seed, epoch, 1]))
        order.setflags(write=False)  # cached and shared with the caller
        self._order = (epoch, order)
        return order

    def _bucketed(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Chunks of BUCKET_GLOBAL_BATCHES global batches sorted by length (stable: ties stay shuffled),
        then the epoch's global batches in a shuffled order; the dropped remainder stays at the end."""
        G, used = self.plan.global_batch_size, self.steps_per_epoch * self.plan.global_batch_size
        lengths, chunk = self.data.lengths(), BUCKET_GLOBAL_BATCHES * G
        sorted_parts = [part[np.argsort(lengths[part], kind="stable")]
                        for part in np.split(order[:used], list(range(chunk, used, chunk)))]
        batches = np.concatenate(sorted_parts).reshape(self.steps_per_epoch, G)
        return np.concatenate([batches[rng.permutation(self.steps_per_epoch)].reshape(-1), order[used:]])

    # ------------------------------------------------------------------------------------- train
    def train(self, start_iteration: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches of this rank: accumulation_steps per global step, from step
        `start_iteration` on (exactly what train(0) yields after that many steps)."""
        if start_iteration < 0:
            raise ValueError(f"start_iteration must be >= 0, got {start_iteration}")
        if self.steps_per_epoch == 0:
            raise ConfigError(f"--global-batch-size {self.plan.global_batch_size} is larger than the "
                              f"{len(self.data)} training examples: lower it (one step needs a full global batch)")
        return self._train(start_iteration)

    def _train(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        G = self.plan.global_batch_size
        while True:
            epoch, g = divmod(step, self.steps_per_epoch)
            batch = self.epoch_order(epoch)[g * G : (g + 1) * G]
            for micro in self._rank_micro_batches(batch):
                yield self._collate([self.data.sample(int(i)) for i in micro], "train")
            step += 1

    def _rank_micro_batches(self, global_batch: np.ndarray) -> list[np.ndarray]:
        share = self.plan.per_rank
        mine = global_batch[self.plan.dp_rank * share : (self.plan.dp_rank + 1) * share]
        return np.split(mine, self.plan.accumulation_steps)

    # ---------------------------------------------------------------------------------- evaluate
    def eval_steps(self) -> int:
        """Global batches evaluate() yields (on every rank): the last one completed with fillers."""
        return -(-len(self.data) // self.plan.global_batch_size)

    def evaluate(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over every example in file order; the last global batch is completed with fillers
        (weight 0, label 0, index -1, the tokens of the shortest real example) so that every rank
        yields eval_steps() * accumulation_steps micro-batches of micro_batch_size."""
        n, G = len(self.data), self.plan.global_batch_size
        filler = int(np.argmin(self.data.lengths())) if n else 0
        zero = self.data.labels.dtype.type(0).item()
        for step in range(self.eval_steps()):
            batch = np.arange(step * G, (step + 1) * G)
            for micro in self._rank_micro_batches(batch):
                samples = [self.data.sample(int(i)) if i < n else
                           {**self.data.sample(filler, weight=0.0), "label": zero, "index": -1} for i in micro]
                yield self._collate(samples, "eval")

    # --------------------------------------------------------------------------------- padding
    def _collate(self, samples: list[dict[str, Any]], mode: str) -> dict[str, torch.Tensor]:
        batch = collate(samples, self.pad_id, self.plan.pad_to, self.plan.pad_multiple)
        counts = self._tokens[mode]
        counts[0] += int((batch["lengths"] * (batch["weight"] > 0)).sum())
        counts[1] += batch["tokens"].numel()
        return batch

    def padding_fraction(self, mode: str = "train") -> float:
        """Share of the computed tokens of what was yielded that are padding (or fillers):
        mode "train", "eval" or "all"; 0.0 before anything was yielded."""
        if mode not in ("train", "eval", "all"):
            raise ValueError(f"mode must be 'train', 'eval' or 'all', got {mode!r}")
        modes = ("train", "eval") if mode == "all" else (mode,)
        real = sum(self._tokens[m][0] for m in modes)
        computed = sum(self._tokens[m][1] for m in modes)
        return 1.0 - real / computed if computed else 0.0

    def token_counts(self, mode: str = "train") -> tuple[int, int]:
        """(real tokens, computed tokens) yielded so far in `mode` ("train" or "eval")."""
        real, computed = self._tokens[mode]
        return real, computed
