"""Megatron-style parallelism: the (pp, dp, tp) mesh, autograd collectives, tensor-parallel layers,
vocab-parallel cross entropy and the model-parallel RNG tracker."""
from .comm import (all_reduce_grads, copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                   reduce_scatter_to_sp, scatter_to_sp, scatter_to_tp)
from .mesh import ParallelConfig, ParallelMesh, validate_model_layout

__all__ = [
    "ParallelConfig", "ParallelMesh", "validate_model_layout",
    "copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
    "scatter_to_sp", "gather_from_sp", "reduce_scatter_to_sp", "all_reduce_grads",
]
