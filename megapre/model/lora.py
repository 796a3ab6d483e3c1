"""LoRA (Hu et al. 2021) on megapre's tensor-parallel linear layers.

A LoRA layer computes y = base(x) + s * dropout(x) A^T B^T with s = alpha / rank, A [r, in] and
B [out, r]; the base weight and bias are frozen and only A and B train. B starts at zero, so a
fresh adapter leaves the model's output unchanged.

Tensor parallelism. Each factor is split the way its base weight is, so no new collective runs:

* column-parallel base (W split by output rows): A [r, in] is replicated, B [out/tp, r] is
  split on dim 0 (`lora_b.tensor_parallel_dim = 0`). A sees the same TP-region input as W (after
  copy_to_tp, or the sequence all-gather under sequence parallelism). Each rank's A gradient
  only holds its own B rows' share, so A carries `tp_partial_grad = True`.
* row-parallel base (W split by input columns): A [r, in/tp] is split on dim 1
  (`lora_a.tensor_parallel_dim = 1`), B [out, r] is replicated. s * (x_i A_i^T) B^T is added to
  the partial product before the all-reduce (or reduce-scatter), so the sum over TP is the full
  update and the bias is still added once. B's gradient is partial per rank: `tp_partial_grad`.

`sync_sequence_parallel_grads` (megapre.parallel.layers, run by the training step after backward)
sums `tp_partial_grad` grads over TP, after which they equal one process's grads on every rank,
so the global grad norm counts them once (replicated: no `tensor_parallel_dim`) and the split
factors once per shard.

Names. The LoRA layer *is* the base layer (a subclass that takes over its weight and bias
Parameter objects) and replaces it in its parent, so base parameters keep their names
(`decoder.layers.3.attention.qkv.weight`) and a pretrained checkpoint loads as before; the
factors are `...qkv.lora_a` / `...qkv.lora_b`.

Init, layout independent: the full fp32 master of each factor is drawn on the CPU from the
generator of (seed, global parameter name) and each rank keeps its shard. A is kaiming-uniform
with a = sqrt(5) (uniform in +-1/sqrt(in), as the paper's reference code and nn.Linear), B is zero.

Dropout on the LoRA input only (base path undropped, as in the paper) draws from the default
generator, which is the same on every TP rank (megapre.parallel.random). The column input is
replicated, so every rank draws the same mask. The row input is split over features: every rank
draws the mask for the *full* width and keeps its own columns, so the mask is the same as one
process's for any TP size (at the cost of drawing tp times more random numbers).

Targets (--lora-targets): qkv (attention.qkv), proj (attention.proj), fc1 (mlp.fc1 and, with
SwiGLU, mlp.gate: both input projections of the MLP), fc2 (mlp.fc2). The output layer and the
embeddings are never adapted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from megapre.errors import ConfigError
from megapre.parallel.comm import (gather_from_tp, group_rank, group_size, reduce_from_tp,
                                   reduce_scatter_to_sp, scatter_to_tp)
from megapre.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megapre.parallel.mesh import ParallelMesh

from .init import _generator

# target name -> module path suffixes it adapts (inside every transformer layer)
TARGET_LAYERS: dict[str, tuple[str, ...]] = {
    "qkv": ("attention.qkv",),
    "proj": ("attention.proj",),
    "fc1": ("mlp.fc1", "mlp.gate"),
    "fc2": ("mlp.fc2",),
}
LORA_PARAMS = ("lora_a", "lora_b")
_LORA_ATTRS = ("lora_rank", "lora_scaling", "lora_dropout")


@dataclass(frozen=True)
class LoRAConfig:
    """--lora-rank, --lora-alpha (scaling s = alpha / rank), --lora-dropout, --lora-targets."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        """Raise ConfigError naming the flag when a setting cannot work."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"--lora-rank={self.rank!r} must be a positive integer")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ConfigError(f"--lora-alpha={self.alpha!r} must be a positive number "
                              "(the update is scaled by alpha / rank)")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"--lora-dropout={self.dropout!r} must be in [0, 1)")
        valid = ", ".join(TARGET_LAYERS)
        if isinstance(self.targets, str) or not self.targets:
            raise ConfigError(f"--lora-targets={self.targets!r} must name one or more of "
                              f"{valid} (comma separated)")
        unknown = [t for t in self.targets if t not in TARGET_LAYERS]
        if unknown:
            raise ConfigError(f"--lora-targets: unknown target(s) {', '.join(map(repr, unknown))}"
                              f"; valid targets are {valid}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"--lora-targets={','.join(self.targets)} names a target twice")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        """Inverse of to_dict (e.g. from a checkpoint's metadata); validated."""
        names = {f.name for f in fields(cls)}
        missing = sorted({"rank", "alpha"} - set(d))
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise ConfigError(f"LoRA config {d!r}: missing {missing or 'nothing'}, unknown keys "
                              f"{unknown or 'none'} (expected {sorted(names)})")
        kw = dict(d)
        if "targets" in kw and not isinstance(kw["targets"], str):
            kw["targets"] = tuple(kw["targets"])
        cfg = cls(**kw)
        cfg.validate()
        return cfg


# -- the layers ----------------------------------------------------------------------------
def _adopt(new: nn.Module, old: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Make `new` (a fresh instance of a related class) hold `old`'s state: the same Parameter
    objects under the same names, and its plain attributes (sizes, group, flags)."""
    nn.Module.__init__(new)
    for key, value in vars(old).items():
        if key not in vars(new) and key not in skip:
            new.__dict__[key] = value
    new._parameters.update((k, v) for k, v in old._parameters.items() if k not in skip)
    new._buffers.update(old._buffers)
    new._modules.update(old._modules)
    new.train(old.training)


def _factor(shape: tuple[int, int], split_dim: int | None, fill, mesh: ParallelMesh,
            like: torch.Tensor) -> nn.Parameter:
    """This rank's shard (or the whole, when `split_dim` is None) of an fp32 master drawn on the
    CPU by `fill`, in `like`'s dtype and device."""
    master = torch.zeros(shape, dtype=torch.float32)
    fill(master)
    if split_dim is not None:
        master = master.chunk(mesh.tp_size, split_dim)[mesh.tp_rank]
    param = nn.Parameter(master.to(device=like.device, dtype=like.dtype).contiguous())
    if split_dim is not None:
        param.tensor_parallel_dim = split_dim
    else:
        param.tp_partial_grad = True
    return param


def _kaiming_a(seed: int, name: str):
    gen = _generator(seed, name)
    return lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)


def _dropout_mask(shape: torch.Size, p: float, like: torch.Tensor) -> torch.Tensor:
    """Inverted-dropout mask drawn from the default generator (fp32 draw for every dtype)."""
    keep = torch.empty(shape, dtype=torch.float32, device=like.device).bernoulli_(1.0 - p)
    return keep.div_(1.0 - p).to(like.dtype)


class _LoRAMixin:
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    lora_rank: int
    lora_scaling: float
    lora_dropout: float

    def _setup_lora(self, cfg: LoRAConfig) -> None:
        self.lora_rank, self.lora_scaling, self.lora_dropout = cfg.rank, cfg.scaling, cfg.dropout

    def _lora(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            x = x * mask
        return self.lora_scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def _dropout_on(self) -> bool:
        return self.training and self.lora_dropout > 0.0

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lora_rank={self.lora_rank}, "
                f"lora_scaling={self.lora_scaling:g}, lora_dropout={self.lora_dropout:g}")


class LoRAColumnParallelLinear(_LoRAMixin, ColumnParallelLinear):
    """A ColumnParallelLinear plus s * dropout(x) A^T B_i^T (A replicated, B split by rows).
    skip_bias_add and gather_output behave as in the base layer."""

    @classmethod
    def from_base(cls, base: ColumnParallelLinear, cfg: LoRAConfig, mesh: ParallelMesh,
                  seed: int, name: str) -> "LoRAColumnParallelLinear":
        layer = cls.__new__(cls)
        _adopt(layer, base)
        layer._setup_lora(cfg)
        w = base.weight
        layer.lora_a = _factor((cfg.rank, base.in_features), None,
                               _kaiming_a(seed, f"{name}.lora_a"), mesh, w)
        layer.lora_b = _factor((base.out_features, cfg.rank), 0, nn.init.zeros_, mesh, w)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.local_input(x)
        mask = _dropout_mask(x.shape, self.lora_dropout, x) if self._dropout_on() else None
        y = F.linear(x, self.weight, None if self.skip_bias_add else self.bias)
        y = y + self._lora(x, mask)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def merge_into_weight(self) -> None:
        """W_i += s B_i A (this rank's rows)."""
        _add_to_weight(self.weight, self.lora_scaling * (self.lora_b.float() @ self.lora_a.float()))


class LoRARowParallelLinear(_LoRAMixin, RowParallelLinear):
    """A RowParallelLinear plus s * dropout(x_i) A_i^T B^T added to each rank's partial product
    before the reduction (A split by columns, B replicated)."""

    @classmethod
    def from_base(cls, base: RowParallelLinear, cfg: LoRAConfig, mesh: ParallelMesh,
                  seed: int, name: str) -> "LoRARowParallelLinear":
        layer = cls.__new__(cls)
        _adopt(layer, base)
        layer._setup_lora(cfg)
        w = base.weight
        layer.lora_a = _factor((cfg.rank, base.in_features), 1,
                               _kaiming_a(seed, f"{name}.lora_a"), mesh, w)
        layer.lora_b = _factor((base.out_features, cfg.rank), None, nn.init.zeros_, mesh, w)
        return layer

    def _row_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The full-width mask, this rank's feature columns of it (layout independent)."""
        if not self._dropout_on():
            return None
        full = _dropout_mask(x.shape[:-1] + (self.in_features,), self.lora_dropout, x)
        return full.chunk(group_size(self.group), -1)[group_rank(self.group)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        lora = self._lora(x, self._row_mask(x))
        if group_size(self.group) == 1 and not torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight, self.bias) + lora
        y = F.linear(x, self.weight) + lora
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, self.group, self.sequence_dim)
        else:
            y = reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y

    def merge_into_weight(self) -> None:
        """W_i += s B A_i (this rank's columns)."""
        _add_to_weight(self.weight, self.lora_scaling * (self.lora_b.float() @ self.lora_a.float()))


LORA_LAYERS = (LoRAColumnParallelLinear, LoRARowParallelLinear)


def _add_to_weight(weight: torch.Tensor, delta: torch.Tensor) -> None:
    with torch.no_grad():
        weight.copy_((weight.float() + delta).to(weight.dtype))


# -- applying, listing, merging ---------------------------------------------------------------
def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child


def _targeted(name: str, cfg: LoRAConfig) -> bool:
    return any(name.endswith("." + suffix) for t in cfg.targets for suffix in TARGET_LAYERS[t])


def apply_lora(model: nn.Module, cfg: LoRAConfig, mesh: ParallelMesh, seed: int) -> list[str]:
    """Replace the targeted layers of `model` by LoRA layers and freeze every other parameter.

    `model` is an unwrapped model piece (a GPTModel / BertModel chunk, not its DDP wrapper:
    wrap after, so DDP sees the final trainable set) whose module paths are the global names
    (`decoder.layers.7.mlp.fc1`); those names seed the factors' init. Returns the replaced
    layers' names. Everything but the LoRA factors ends with requires_grad=False: un-freeze a
    task head afterwards.
    """
    cfg.validate()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("apply_lora: pass the model inside DistributedDataParallel and wrap it "
                         "afterwards (DDP fixes its set of trainable parameters when built)")
    if any(isinstance(m, LORA_LAYERS) for m in model.modules()):
        raise ValueError("apply_lora: this model already has LoRA layers (apply it once, or "
                         "merge_lora first)")
    names = [n for n, m in model.named_modules()
             if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and _targeted(n, cfg)]
    if not names:
        raise ConfigError(f"--lora-targets={','.join(cfg.targets)}: the model has no such layers "
                          f"(looked for module names ending in "
                          f"{', '.join(s for t in cfg.targets for s in TARGET_LAYERS[t])})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        kind = (LoRAColumnParallelLinear if isinstance(base, ColumnParallelLinear)
                else LoRARowParallelLinear)
        setattr(parent, child, kind.from_base(base, cfg, mesh, seed, name))
    return names


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA factors (`decoder.layers.0.attention.qkv.lora_a`, ...), in model order."""
    return [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)
            for p in LORA_PARAMS]


def merge_lora(model: nn.Module) -> int:
    """Fold s * B A into each LoRA layer's base weight shard and turn it back into a plain
    Column/RowParallelLinear (same parameter names, factors gone). The merged model computes
    what the LoRA model computes in eval mode. requires_grad is left as it was (frozen).
    Returns the number of layers merged."""
    names = [n for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)]
    for name in names:
        parent, child = _parent(model, name)
        layer = getattr(parent, child)
        layer.merge_into_weight()
        base_cls = (ColumnParallelLinear if isinstance(layer, ColumnParallelLinear)
                    else RowParallelLinear)
        plain = base_cls.__new__(base_cls)
        _adopt(plain, layer, skip=LORA_PARAMS + _LORA_ATTRS)
        setattr(parent, child, plain)
    return len(names)


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts of this rank's parameters (local shards: summing the
    full sizes over TP/PP is the caller's job)."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
