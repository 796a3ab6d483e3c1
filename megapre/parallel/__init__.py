"""Megatron-style parallelism: the (pp, dp, cp, tp) mesh, autograd collectives, tensor-parallel
layers, vocab-parallel cross entropy, context parallelism's ring attention and the model-parallel
RNG tracker.

The names below are importable from here (`from megapre.parallel import ParallelMesh`); they load
on first use, so the torch-free layout rules (layout.py) can be imported, and a run's flags checked
and its banner printed, before torch is."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "comm": ("all_reduce_grads", "copy_to_tp", "gather_from_sp", "gather_from_tp",
             "reduce_from_tp", "reduce_scatter_to_sp", "scatter_to_sp", "scatter_to_tp"),
    "context": ("ContextGroup", "merge_sequence", "ring_attention", "split_sequence",
                "zigzag_positions"),
    "cross_entropy": ("vocab_parallel_cross_entropy",),
    "distributed_optimizer": ("DistributedOptimizer",),
    "layers": ("ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
               "full_state_dict", "gather_full_param", "load_full_param", "normal_init",
               "padded_vocab_size", "sync_sequence_parallel_grads"),
    "layout": ("StageSplit", "check_model_split"),
    "mesh": ("ParallelConfig", "ParallelMesh"),
    "random": ("MODEL_PARALLEL_RNG", "RNGTracker", "recompute", "set_random_seed"),
}
_OWNER = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_OWNER)


def __getattr__(name: str):
    if name in _OWNER:
        return getattr(importlib.import_module(f".{_OWNER[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
