"""Tensor-parallel layers (Megatron style): column- and row-parallel linear, vocab-parallel embedding.

Layout independence starts here: every layer builds the *full* master weight on the CPU in fp32
with the caller's `init_method`, then keeps its own shard. With the same seed the gathered weight
equals the single-process layer's for any TP size, so every (TP, PP, DP) layout trains the same
model. (The full matrix is briefly held on each rank, as in Megatron's `use_cpu_initialization`.)

Sharded parameters carry `param.tensor_parallel_dim` (the dim split over TP). Replicated
parameters whose gradient is only partial on each rank under sequence parallelism (row-parallel
bias; norms elsewhere) carry `param.sequence_parallel = True`, and replicated parameters whose
gradient is partial on each rank for another reason (LoRA's replicated factor) carry
`param.tp_partial_grad = True`; `sync_sequence_parallel_grads` sums both kinds over TP after
backward.

Activations are Megatron's [s, b, h]; the sequence dim used under sequence parallelism is
`sequence_dim` (default 0).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megapre.ops import export_mode

from .comm import (all_reduce_grads, copy_to_tp, gather_from_sp, gather_from_tp, group_size,
                   reduce_from_tp, reduce_scatter_to_sp, scatter_to_tp)
from .mesh import ParallelMesh

InitMethod = Callable[[torch.Tensor], object]  # fills a tensor in place, e.g. nn.init.normal_


def normal_init(std: float = 0.02, generator: torch.Generator | None = None) -> InitMethod:
    """N(0, std) in place: Megatron's default weight init (std 0.02)."""
    return functools.partial(nn.init.normal_, mean=0.0, std=std, generator=generator)


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                      tensor_parallel: int = 1) -> int:
    """Round the vocabulary up to a multiple of make_vocab_size_divisible_by x TP.

    The padding rows keep every TP shard the same size (and GEMMs aligned); the cross entropy
    never lets a padding logit win.
    """
    for flag, value in (("vocab size", vocab_size),
                        ("--make-vocab-size-divisible-by", make_vocab_size_divisible_by),
                        ("--tensor-model-parallel-size", tensor_parallel)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    multiple = make_vocab_size_divisible_by * tensor_parallel
    return math.ceil(vocab_size / multiple) * multiple


def _shard_of_master(shape: tuple[int, ...], dim: int, init_method: InitMethod, mesh: ParallelMesh,
                     dtype: torch.dtype, device: torch.device,
                     init_rows: int | None = None) -> nn.Parameter:
    """This rank's shard of a master weight built on the CPU in fp32.

    With `init_rows`, only the first rows are drawn from `init_method` and the rest (vocabulary
    padding) are zero, so neither the weights nor the RNG state after init depend on how much
    padding the TP size required.
    """
    if getattr(init_method, "skips_init", False):  # the caller overwrites every value
        return _uninitialized(shape, dim, mesh, dtype, device)
    master = torch.zeros(shape, dtype=torch.float32)
    if init_rows is None:
        init_method(master)
    else:
        if not 0 < init_rows <= shape[0]:
            raise ValueError(f"true vocabulary size {init_rows} must be in [1, {shape[0]}] "
                             "(the padded size)")
        init_method(master[:init_rows])
    shard = master.to(dtype).chunk(mesh.tp_size, dim)[mesh.tp_rank]
    param = nn.Parameter(shard.to(device).contiguous())
    param.tensor_parallel_dim = dim
    return param


def _uninitialized(shape: tuple[int, ...], dim: int, mesh: ParallelMesh, dtype: torch.dtype,
                   device: torch.device) -> nn.Parameter:
    """This rank's shard, allocated but never written (pages untouched until loaded into)."""
    local = list(shape)
    local[dim] //= mesh.tp_size
    param = nn.Parameter(torch.empty(local, dtype=dtype, device=device))
    param.tensor_parallel_dim = dim
    return param


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} {total} is not divisible by --tensor-model-parallel-size {parts}")
    return total // parts


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) over TP.

    Input is replicated over TP (or, under sequence parallelism, this rank's sequence chunk, which
    is all-gathered first). Output is this rank's slice of the features, or the full features
    with `gather_output=True`. With `skip_bias_add=True` the bias is left for the caller to fuse
    into what follows (e.g. ops.bias_gelu). As an output layer over a padded vocabulary, pass the
    true vocab as `init_out_features` so the padding rows start at zero whatever the TP size.
    """

    def __init__(self, in_features: int, out_features: int, mesh: ParallelMesh, *,
                 bias: bool = True, gather_output: bool = False,
                 init_method: InitMethod | None = None, sequence_parallel: bool | None = None,
                 sequence_dim: int = 0, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None,
                 init_out_features: int | None = None, skip_bias_add: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.skip_bias_add = skip_bias_add
        self.group = mesh.tp_group
        self.gather_output = gather_output
        self.sequence_parallel = mesh.sequence_parallel if sequence_parallel is None else (
            sequence_parallel and mesh.tp_size > 1)
        self.sequence_dim = sequence_dim
        if self.sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True cannot be combined with "
                             "sequence parallelism (the output would not be sequence-sharded)")
        _divide(out_features, mesh.tp_size, "ColumnParallelLinear output size")
        device = torch.device(device) if device is not None else mesh.device
        self.weight = _shard_of_master((out_features, in_features), 0,
                                       init_method or normal_init(), mesh, params_dtype, device,
                                       init_out_features)
        self.bias = None
        if bias:
            self.bias = _shard_of_master((out_features,), 0, nn.init.zeros_, mesh, params_dtype,
                                         device)

    def local_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input every TP rank multiplies: the gathered sequence under sequence parallelism,
        else x itself (its gradient summed over TP in backward). Shared by subclasses (LoRA,
        int8) that change only the product."""
        if self.sequence_parallel:
            return gather_from_sp(x, self.group, self.sequence_dim)
        return copy_to_tp(x, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.local_input(x), self.weight, None if self.skip_bias_add else self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features) over TP.

    Each rank multiplies its slice of the input features; the partial products are all-reduced
    (or reduce-scattered along the sequence under sequence parallelism) and only then is the
    replicated bias added, once.
    """

    def __init__(self, in_features: int, out_features: int, mesh: ParallelMesh, *,
                 bias: bool = True, input_is_parallel: bool = True,
                 init_method: InitMethod | None = None, sequence_parallel: bool | None = None,
                 sequence_dim: int = 0, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group = mesh.tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = mesh.sequence_parallel if sequence_parallel is None else (
            sequence_parallel and mesh.tp_size > 1)
        self.sequence_dim = sequence_dim
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence parallelism needs input_is_parallel=True "
                             "(the input must already be split over the features)")
        _divide(in_features, mesh.tp_size, "RowParallelLinear input size")
        device = torch.device(device) if device is not None else mesh.device
        self.weight = _shard_of_master((out_features, in_features), 1,
                                       init_method or normal_init(), mesh, params_dtype, device)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=params_dtype, device=device))
            self.bias.sequence_parallel = self.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1 and not torch.is_autocast_enabled(x.device.type):
            # nothing to reduce: the bias goes into the GEMM (under autocast it stays a float32
            # add after the GEMM, as at TP > 1, so every layout rounds alike)
            return F.linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, self.group, self.sequence_dim)
        else:
            y = reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, "
                f"input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows over TP.

    `num_embeddings` is the padded vocabulary (see `padded_vocab_size`). Each rank looks up the
    ids it owns, zeros the rest, and the partial results are summed over TP; with
    `sequence_parallel=True` they are reduce-scattered along `sequence_dim` of the output instead
    (pass ids as [s, b] to get Megatron's [s/tp, b, h]). Off by default because a model usually
    adds position embeddings before the sequence is split. With `vocab_size` (the true vocab)
    only real rows are drawn from `init_method` and padding rows are zero, so initial weights are
    the same for every TP size (whose padded vocabularies differ).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, mesh: ParallelMesh, *,
                 init_method: InitMethod | None = None, sequence_parallel: bool = False,
                 sequence_dim: int = 0, check_ids: bool = True,
                 params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None,
                 vocab_size: int | None = None) -> None:
        super().__init__()
        if num_embeddings % mesh.tp_size:
            raise ValueError(
                f"VocabParallelEmbedding: vocabulary {num_embeddings} is not divisible by "
                f"--tensor-model-parallel-size {mesh.tp_size}; pad it with "
                f"padded_vocab_size(vocab, make_vocab_size_divisible_by, {mesh.tp_size})")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group = mesh.tp_group
        self.per_rank = num_embeddings // mesh.tp_size
        self.vocab_start = mesh.tp_rank * self.per_rank
        self.sequence_parallel = sequence_parallel and mesh.tp_size > 1
        self.sequence_dim = sequence_dim
        self.check_ids = check_ids
        device = torch.device(device) if device is not None else mesh.device
        self.vocab_size = vocab_size
        self.weight = _shard_of_master((num_embeddings, embedding_dim), 0,
                                       init_method or normal_init(), mesh, params_dtype, device,
                                       vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # one host sync; out-of-range ids would otherwise just embed to 0 (export mode: no
        # syncs in a traced graph)
        if self.check_ids and not export_mode.active():
            _check_ids(ids, self.vocab_size or self.num_embeddings)
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.group, self.sequence_dim)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (local rows {self.vocab_start}.."
                f"{self.vocab_start + self.per_rank - 1}), {self.embedding_dim}")


def _check_ids(ids: torch.Tensor, vocab: int) -> None:
    if ids.dtype.is_floating_point:
        raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
        lo, hi = int(ids.min()), int(ids.max())
        raise ValueError(f"token ids must lie in [0, {vocab}); got values in [{lo}, {hi}] "
                         "(does the tokenizer's vocabulary match the model's vocab size?)")


def sync_sequence_parallel_grads(module: nn.Module, mesh: ParallelMesh) -> None:
    """Sum over TP the grads of replicated params whose grad is only a partial sum on each TP
    rank: those that saw only a sequence chunk (`p.sequence_parallel`) and those whose grad
    each rank computes from its own shard of a neighbouring factor (`p.tp_partial_grad`, e.g.
    LoRA's replicated factor, megapre/model/lora.py). Afterwards every TP rank holds the full
    grad."""
    params = [p for p in module.parameters()
              if getattr(p, "sequence_parallel", False) or getattr(p, "tp_partial_grad", False)]
    all_reduce_grads(params, mesh.tp_group)


# -- full weights (checkpoints, tests) -------------------------------------------------------
def gather_full_param(param: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    """The full (unsharded) tensor of a TP-sharded param; a copy of a replicated one."""
    dim = getattr(param, "tensor_parallel_dim", None)
    data = param.detach()
    if dim is None or mesh.tp_size == 1:
        return data.clone()
    with torch.no_grad():
        return gather_from_tp(data.movedim(dim, -1), mesh.tp_group).movedim(-1, dim).contiguous()


def load_full_param(param: torch.Tensor, full: torch.Tensor, mesh: ParallelMesh) -> None:
    """Copy this rank's shard of `full` into `param` (inverse of gather_full_param)."""
    dim = getattr(param, "tensor_parallel_dim", None)
    expect = list(param.shape)
    if dim is not None:
        expect[dim] *= mesh.tp_size
    if list(full.shape) != expect:
        raise ValueError(f"full tensor has shape {tuple(full.shape)}, expected {tuple(expect)} "
                         f"for a parameter of local shape {tuple(param.shape)} at TP "
                         f"{mesh.tp_size}")
    shard = full if dim is None else full.chunk(mesh.tp_size, dim)[mesh.tp_rank]
    with torch.no_grad():
        param.copy_(shard)


def full_state_dict(module: nn.Module, mesh: ParallelMesh) -> dict[str, torch.Tensor]:
    """Every parameter of `module` gathered to its full shape (same on all TP ranks)."""
    return {name: gather_full_param(p, mesh) for name, p in module.named_parameters()}
