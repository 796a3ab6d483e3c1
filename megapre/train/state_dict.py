"""The layout-independent names and shapes of a model's (and its AdamW's) state, for checkpoints.

A checkpoint must load under any (TP, PP, DP, virtual pipeline) layout, so nothing in it may
depend on the layout that wrote it:

  * names are the unwrapped model's parameter names, which are layout-independent by
    construction (layers are keyed by their global index: `decoder.layers.7.mlp.fc1.weight`
    whatever stage holds it; the same name seeds the parameter's initialization);
  * a TP-sharded parameter is a DTensor view (Shard(tensor_parallel_dim)) on the TP sub-mesh, so
    torch.distributed.checkpoint records global offsets and re-slices on load for any TP size;
  * vocabulary tables (word embedding, untied output layer, BERT's LM-head bias) are padded to a
    multiple of make_vocab_size_divisible_by x TP, so their padded length depends on TP; they are
    stored unpadded ([vocab_size, ...], gathered over TP) and each rank takes its rows on load,
    with the padding rows set to zero as at initialization;
  * the last pipeline stage's copy of a tied word table is never stored: it loads from the first
    stage's `embedding.word.weight` (weights and AdamW state are equal by construction);
  * replicated parameters are plain tensors; DCP writes each once, whatever the DP/TP size.

AdamW state (exp_avg, exp_avg_sq, step, any other per-parameter tensor) is named
`optim.<param name>.<state key>` and laid out exactly like its parameter, so it reshards too.
The distributed optimizer's DP-sharded state is assembled into those same per-parameter tensors
on save and sliced back on load (collective over DP), so a checkpoint loads with or without
--use-distributed-optimizer and under any DP size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from megapre.model.config import TransformerConfig
from megapre.parallel.comm import group_size
from megapre.parallel.distributed_optimizer import STATE_NAMES, DistributedOptimizer
from megapre.parallel.mesh import ParallelMesh

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
# Parameters whose dim 0 is the padded vocabulary (stored unpadded).
VOCAB_TABLES = ("embedding.word.weight", "output_layer.weight", "output_word.weight", "heads.bias",
                "output_quant.weight", "output_quant.weight_scale")  # the last two: int8 LM head
TIED_COPY, TIED_SOURCE = "output_word.weight", "embedding.word.weight"


@dataclass(frozen=True)
class ParamSlot:
    """One local parameter and how it maps onto the checkpoint."""

    key: str  # layout-independent name (without the model./optim. prefix)
    param: nn.Parameter
    tp_dim: int | None  # dim sharded over TP (None = replicated)
    vocab: bool  # dim 0 is the TP-padded vocabulary: stored as [vocab_size, ...]
    tied_copy: bool  # last stage's copy of the tied word table: loaded from `key`, never saved


KeyFilter = Callable[[str], bool]  # which parameters (by checkpoint name) a save/load covers


def param_slots(models: list[nn.Module], keep: KeyFilter | None = None) -> list[ParamSlot]:
    """Slots of every parameter of this rank's model chunks (GPTModel / BertModel pieces), or
    of those whose name `keep` accepts (a LoRA checkpoint holds only the adapters and head)."""
    slots, seen = [], set()
    for model in models:
        for name, p in model.named_parameters():
            if keep is not None and not keep(name):
                continue
            tied = name == TIED_COPY
            key = TIED_SOURCE if tied else name
            if key in seen and not tied:
                raise ValueError(f"parameter {key!r} appears twice among this rank's chunks")
            seen.add(key)
            slots.append(ParamSlot(key, p, getattr(p, "tensor_parallel_dim", None),
                                   name in VOCAB_TABLES, tied))
    return slots


def global_shape(slot: ParamSlot, local: torch.Tensor, mesh: ParallelMesh,
                 cfg: TransformerConfig) -> tuple[int, ...]:
    """Shape of `local` (the param or a param-shaped state) in the checkpoint."""
    shape = list(local.shape)
    if local.dim() == 0:
        return ()
    if slot.vocab:
        shape[0] = cfg.vocab_size
    elif slot.tp_dim is not None:
        shape[slot.tp_dim] *= mesh.tp_size
    return tuple(shape)


def _param_shaped(state: torch.Tensor, slot: ParamSlot) -> bool:
    return state.dim() > 0 and state.shape == slot.param.shape


# -- saving ------------------------------------------------------------------------------------
def gather_tp(t: torch.Tensor, dim: int, mesh: ParallelMesh) -> torch.Tensor:
    """The full tensor of a TP shard (collective over the TP group)."""
    if group_size(mesh.tp_group) == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(mesh.tp_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=mesh.tp_group)
    return torch.cat(parts, dim)


def _saved_view(slot: ParamSlot, t: torch.Tensor, mesh: ParallelMesh, cfg: TransformerConfig):
    t = t.detach()
    if slot.vocab and t.dim() > 0:
        return gather_tp(t, 0, mesh)[:cfg.vocab_size]
    if slot.tp_dim is not None and mesh.tp_size > 1 and _param_shaped(t, slot):
        return _dtensor(t, slot.tp_dim, mesh, global_shape(slot, t, mesh, cfg))
    return t


def _dtensor(local: torch.Tensor, dim: int, mesh: ParallelMesh, shape: tuple[int, ...]) -> DTensor:
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh.device_mesh["tp"], [Shard(dim)], run_check=False,
                              shape=torch.Size(shape), stride=stride)


def optimizer_states(optimizer: torch.optim.Optimizer | None, slot: ParamSlot
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(state name, tensor) of `slot`'s parameter; full tensors assembled over DP for a
    DistributedOptimizer (a collective: every DP rank asks for the same slots in order)."""
    if optimizer is None:
        return
    if isinstance(optimizer, DistributedOptimizer):
        yield from optimizer.full_param_state(slot.param).items()
        return
    for name, value in optimizer.state.get(slot.param, {}).items():
        if torch.is_tensor(value):
            yield name, value


def save_state_dict(models: list[nn.Module], optimizer: torch.optim.Optimizer | None,
                    mesh: ParallelMesh, cfg: TransformerConfig, keep: KeyFilter | None = None
                    ) -> dict[str, torch.Tensor]:
    """Checkpoint entries of this rank (collective over TP for the vocabulary tables, and over
    DP for a DistributedOptimizer's state)."""
    _settle(optimizer)
    out: dict[str, torch.Tensor] = {}
    for slot in param_slots(models, keep):
        if slot.tied_copy:
            continue
        out[MODEL_PREFIX + slot.key] = _saved_view(slot, slot.param, mesh, cfg)
        for name, state in optimizer_states(optimizer, slot):
            out[f"{OPTIM_PREFIX}{slot.key}.{name}"] = _saved_view(slot, state, mesh, cfg)
    return out


# -- loading -----------------------------------------------------------------------------------
@dataclass
class LoadTarget:
    """Where DCP should write one entry, and how to move it into the live tensor afterwards."""

    key: str
    value: torch.Tensor  # handed to dcp.load (filled in place)
    shape: tuple[int, ...]  # expected global shape in the checkpoint
    finish: Callable[[], None]


def _load_target(key: str, slot: ParamSlot, live: torch.Tensor, mesh: ParallelMesh,
                 cfg: TransformerConfig) -> LoadTarget:
    live = live.detach()
    shape = global_shape(slot, live, mesh, cfg)
    if slot.vocab and live.dim() > 0:
        buf = torch.empty(shape, dtype=live.dtype, device=live.device)

        def take_rows() -> None:
            per = live.shape[0]
            start = mesh.tp_rank * per
            rows = buf[start:min(start + per, cfg.vocab_size)]
            live[:rows.shape[0]].copy_(rows)
            live[rows.shape[0]:].zero_()
        return LoadTarget(key, buf, shape, take_rows)
    if slot.tp_dim is not None and mesh.tp_size > 1 and _param_shaped(live, slot):
        view = _dtensor(live, slot.tp_dim, mesh, shape)
        return LoadTarget(key, view, shape, lambda: _copy_if_moved(view.to_local(), live))
    return LoadTarget(key, live, shape, lambda: None)


def _copy_if_moved(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.data_ptr() != dst.data_ptr():
        dst.copy_(src)


def load_targets(models: list[nn.Module], optimizer: torch.optim.Optimizer | None,
                 mesh: ParallelMesh, cfg: TransformerConfig,
                 saved_states: dict[str, list[str]] | None = None,
                 keep: KeyFilter | None = None) -> list[LoadTarget]:
    """Entries this rank needs (of the parameters `keep` accepts). `saved_states` (param key ->
    optimizer state names found in the checkpoint) lets a fresh optimizer, which has no state
    yet, get buffers to load into."""
    _settle(optimizer)
    targets = []
    for slot in param_slots(models, keep):
        targets.append(_load_target(MODEL_PREFIX + slot.key, slot, slot.param, mesh, cfg))
        if optimizer is None:
            continue
        if isinstance(optimizer, DistributedOptimizer):
            targets += _sharded_state_targets(optimizer, slot, mesh, cfg, saved_states)
            continue
        state = optimizer.state[slot.param]
        for name in (saved_states or {}).get(slot.key, []):
            if name not in state:
                state[name] = _fresh_state(optimizer, slot, name)
        for name, value in optimizer_states(optimizer, slot):
            targets.append(_load_target(f"{OPTIM_PREFIX}{slot.key}.{name}", slot, value, mesh,
                                        cfg))
    return targets


def _settle(optimizer) -> None:
    """A DistributedOptimizer's parameter all-gathers still in flight (--overlap-param-gather)
    finish before the parameters are read or overwritten."""
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.finish_param_sync()


def _sharded_state_targets(optimizer: DistributedOptimizer, slot: ParamSlot, mesh: ParallelMesh,
                           cfg: TransformerConfig, saved_states: dict[str, list[str]] | None
                           ) -> list[LoadTarget]:
    """Full-parameter buffers (TP shard, as torch's AdamW would hold them) that DCP fills; each
    finish hands this rank's DP slices to the optimizer. An optimizer that already has state
    asks for all of it (so a checkpoint without it is reported, as for torch's AdamW)."""
    names = list((saved_states or {}).get(slot.key, []))
    if optimizer.has_state:
        names += [n for n in ("step", *STATE_NAMES) if n not in names]
    out = []
    for name in names:
        buf = torch.zeros((), dtype=torch.float32, device=slot.param.device) if name == "step" \
            else torch.zeros_like(slot.param, dtype=torch.float32)
        inner = _load_target(f"{OPTIM_PREFIX}{slot.key}.{name}", slot, buf, mesh, cfg)

        def finish(inner=inner, name=name, buf=buf, param=slot.param) -> None:
            inner.finish()
            optimizer.load_param_state(param, name, buf)
        out.append(LoadTarget(inner.key, inner.value, inner.shape, finish))
    return out


def _fresh_state(optimizer: torch.optim.Optimizer, slot: ParamSlot, name: str) -> torch.Tensor:
    """A buffer for state `name` shaped as torch's AdamW/Adam create it: the step counter is a
    float32 scalar (on the CPU unless fused/capturable), moments are shaped like the param."""
    if name == "step":
        group = next(g for g in optimizer.param_groups
                     if any(p is slot.param for p in g["params"]))
        on_device = group.get("fused") or group.get("capturable")
        return torch.zeros((), dtype=torch.float32,
                           device=slot.param.device if on_device else "cpu")
    return torch.zeros_like(slot.param, memory_format=torch.preserve_format)


def optimizer_state_names(keys: list[str], model_keys: set[str]) -> dict[str, list[str]]:
    """{param key: [state names]} of a checkpoint's `optim.` entries."""
    out: dict[str, list[str]] = {}
    for key in keys:
        if not key.startswith(OPTIM_PREFIX):
            continue
        param, _, name = key[len(OPTIM_PREFIX):].rpartition(".")
        if param in model_keys:
            out.setdefault(param, []).append(name)
    return out


# -- full tensors (tests, export) --------------------------------------------------------------
def full_state(models: list[nn.Module], optimizer: torch.optim.Optimizer | None,
               mesh: ParallelMesh, cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    """This rank's entries as full, unpadded tensors under their checkpoint names (collective over
    TP). Every rank of a stage returns the same dict; union over stages = the whole model."""
    _settle(optimizer)
    out = {}
    for slot in param_slots(models):
        if slot.tied_copy:
            continue
        items = [(MODEL_PREFIX + slot.key, slot.param)]
        items += [(f"{OPTIM_PREFIX}{slot.key}.{n}", s)
                  for n, s in optimizer_states(optimizer, slot)]
        for key, t in items:
            t = t.detach()
            if slot.vocab and t.dim() > 0:
                t = gather_tp(t, 0, mesh)[:cfg.vocab_size]
            elif slot.tp_dim is not None and _param_shaped(t, slot):
                t = gather_tp(t, slot.tp_dim, mesh)
            out[key] = t.cpu().clone()
    return out
