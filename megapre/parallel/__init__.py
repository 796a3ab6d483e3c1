"""Megatron-style parallelism: the (pp, dp, tp) mesh, autograd collectives, tensor-parallel layers,
vocab-parallel cross entropy and the model-parallel RNG tracker."""
from .comm import (all_reduce_grads, copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                   reduce_scatter_to_sp, scatter_to_sp, scatter_to_tp)
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                     full_state_dict, gather_full_param, load_full_param, normal_init,
                     padded_vocab_size, sync_sequence_parallel_grads)
from .layout import check_model_split
from .mesh import ParallelConfig, ParallelMesh
from .random import MODEL_PARALLEL_RNG, RNGTracker, recompute, set_random_seed

__all__ = [
    "ParallelConfig", "ParallelMesh", "check_model_split",
    "copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
    "scatter_to_sp", "gather_from_sp", "reduce_scatter_to_sp", "all_reduce_grads",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "padded_vocab_size",
    "normal_init", "gather_full_param", "load_full_param", "full_state_dict",
    "sync_sequence_parallel_grads", "vocab_parallel_cross_entropy",
    "RNGTracker", "MODEL_PARALLEL_RNG", "set_random_seed", "recompute",
]
