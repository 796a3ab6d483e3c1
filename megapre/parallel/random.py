"""Random state for model parallelism, and activation recomputation that replays it exactly.

Two streams per rank:
  * the default generators (CPU and the GPU's), seeded `seed + PP_SEED_STRIDE * pp_rank`: the
    same on every TP and DP rank of a stage, so dropout on replicated activations (after a
    row-parallel layer, on the residual stream) draws the same mask everywhere;
  * the tracker's `MODEL_PARALLEL_RNG` stream, seeded `seed + PP_SEED_STRIDE * pp_rank +
    TP_SEED_OFFSET + tp_rank`: used (`with tracker.fork():`) for dropout on TP-sharded
    activations (attention probabilities of this rank's heads), which must differ per shard or the
    heads of different ranks would share masks. Under sequence parallelism the residual-stream
    dropout also acts on sharded activations (each rank holds a different sequence chunk), so it
    belongs inside the fork too, as in Megatron-LM.
The constants are Megatron-LM's (2718 and 100), so seeds line up with a Megatron run.

`recompute(fn, *args, tracker=...)` is activation checkpointing that restores the default
generators and the tracker's streams before re-running `fn`, so the recomputed dropout masks are
bit-identical to the first forward. The model uses it two ways:
  * full recompute: wrap a whole transformer block (`recompute(block, hidden, mask)`);
  * selective recompute: wrap only the attention core (softmax(QK^T) with its dropout, times V),
    whose activations are large (b * heads * s^2) but cheap to recompute, as in Megatron's
    `--recompute-granularity selective`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint

from .mesh import ParallelMesh

MODEL_PARALLEL_RNG = "model-parallel-rng"
TP_SEED_OFFSET = 2718  # added to the stage seed for the TP-sharded stream (Megatron's value)
PP_SEED_STRIDE = 100  # seed offset per pipeline stage (Megatron's value)


class _DeviceStates:
    """Get/set the default generator state of the CPU and, when used, one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None
        return torch.get_rng_state(), cuda

    def set(self, states: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(states[0])
        if self.cuda is not None:
            torch.cuda.set_rng_state(states[1], self.cuda)

    def fresh(self, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """States of newly seeded generators (the default generators are left untouched)."""
        cuda = None
        if self.cuda is not None:
            cuda = torch.Generator(device=self.cuda).manual_seed(seed).get_state()
        return torch.Generator().manual_seed(seed).get_state(), cuda


class RNGTracker:
    """Named random streams that can be swapped in for the default generators.

    `fork(name)` makes `name` the active stream for the block, then saves where it got to and
    puts the default generators back, so code outside never notices.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._dev = _DeviceStates(torch.device(device))
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        self._states[name] = self._dev.fresh(seed)

    def reset(self) -> None:
        self._states.clear()

    def get_states(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return {name: (cpu.clone(), None if dev is None else dev.clone())
                for name, (cpu, dev) in self._states.items()}

    def set_states(self, states: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self._states = {name: (cpu.clone(), None if dev is None else dev.clone())
                        for name, (cpu, dev) in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added; call set_random_seed(seed, "
                           "mesh) (or tracker.add) before the first forward")
        outside = self._dev.get()
        self._dev.set(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._dev.get()
            self._dev.set(outside)


def stage_seed(seed: int, mesh: ParallelMesh) -> int:
    return seed + PP_SEED_STRIDE * mesh.pp_rank


def tensor_parallel_seed(seed: int, mesh: ParallelMesh) -> int:
    return stage_seed(seed, mesh) + TP_SEED_OFFSET + mesh.tp_rank


def set_random_seed(seed: int, mesh: ParallelMesh) -> RNGTracker:
    """Seed the default generators for this stage and return a tracker with the TP stream."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    torch.manual_seed(stage_seed(seed, mesh))
    tracker = RNGTracker(mesh.device)
    tracker.add(MODEL_PARALLEL_RNG, tensor_parallel_seed(seed, mesh))
    return tracker


def _replay_contexts(tracker: RNGTracker | None):
    """Context managers for torch's checkpoint: remember the tracker at forward, replay it at
    recompute, and leave it where the real forward left it afterwards."""
    saved: dict = {}

    @contextlib.contextmanager
    def forward_ctx():
        if tracker is not None:
            saved["states"] = tracker.get_states()
        yield

    @contextlib.contextmanager
    def recompute_ctx():
        if tracker is None:
            yield
            return
        after = tracker.get_states()
        tracker.set_states(saved["states"])
        try:
            yield
        finally:
            tracker.set_states(after)

    return forward_ctx(), recompute_ctx()


def recompute(fn: Callable[..., Any], *args: Any, tracker: RNGTracker | None = None,
              **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` without keeping its activations; redo it during backward.

    The CPU/CUDA default generators (by torch's checkpoint) and every stream of `tracker` are
    rewound to their forward-time states for the recomputation, so dropout inside `fn` draws
    the same masks twice. Non-reentrant checkpointing: works with kwargs, nested modules and
    inputs that do not require grad.
    """
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True,
        context_fn=lambda: _replay_contexts(tracker), **kwargs)
