"""Megatron's distributed optimizer (ZeRO-1): AdamW state sharded over the data-parallel group.

Each pipeline stage's trainable parameters (one dtype at a time) live in one flat buffer, their
gradients in a second one of the same layout; `p.data` and `p.grad` are views into them. The
buffers are cut into buckets (in reverse parameter order, roughly the order backward produces
gradients), each padded to a multiple of DP; DP rank r owns the r-th contiguous 1/DP of every
bucket. A step then runs

    backward -> reduce-scatter (SUM) of each bucket's grads: rank r holds the summed grads of its
    slices (launched from the grad hooks during backward with overlap_grad_reduce)
    -> global grad norm from the owned slices (summed over DP, TP and PP as in grads.py), clip
    -> fused AdamW on the owned slices only -> all-gather of each bucket's updated params
    (waited for at the next forward with overlap_param_gather)

The sum, not the mean, is what DDP's comm hook also computes (data_parallel.py): the losses are
shares of the global-batch mean. AdamW runs on one "piece" per (parameter, owned slice)
intersection, in the parameter's own group, so weight decay is exact per element and the update
is element for element the one torch.optim.AdamW computes on the whole parameter. Parameters
are fp32 in megapre (autocast computes in bf16/fp16), so the parameter buffer is the master copy:
per rank the AdamW state shrinks from 8 to 8/DP bytes per parameter (plus bucket padding;
8 x N / DP with N instances).

With N optimizer instances (Megatron's --num-distributed-optimizer-instances, the mesh's
`optimizer_shard_group` / `optimizer_instance_group`) "DP" above is one instance, DP x CP / N
ranks: buckets are padded to a multiple of that, reduce-scattered and all-gathered within it,
and after the reduce-scatter each owned slice is all-reduced (SUM) across the N ranks that own
the same slice, so it holds the sum over all of DP x CP and every instance takes the same step.
Statistics over the owned slices (grad norm, zeros, params norm) are summed within one instance
only. With --overlap-grad-reduce the in-instance reduce-scatters start during backward, the
cross-instance all-reduces when the step's last backward is done (each as soon as its bucket's
reduce-scatter has finished), in bucket order on every rank.

Checkpoints see the non-distributed layout: `full_param_state` assembles a parameter's
exp_avg / exp_avg_sq / step over DP and `load_param_state` takes back this rank's slices, so a
checkpoint moves freely between DP sizes and to and from torch's AdamW. (While a checkpoint is
written or read, each rank briefly holds the whole stage's AdamW state, as without sharding.)

Collectives are torch.distributed's reduce_scatter_tensor and all_gather_into_tensor, in place
on the buffers; gloo implements both on CPU tensors (checked on torch 2.14), so the CPU tests run
the same code as NCCL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .comm import group_size
from .grads import reduce_grad_norm
from .mesh import ParallelMesh

STATE_NAMES = ("exp_avg", "exp_avg_sq")  # per-element AdamW state; "step" is a scalar


def default_bucket_size(dp_size: int, overlap: bool) -> int | None:
    """Megatron's default `--ddp-bucket-size` (elements): max(40M, 1M x DP) when overlapping,
    else one bucket per buffer (None)."""
    return max(40_000_000, 1_000_000 * dp_size) if overlap else None


@dataclass
class _Piece:
    """The part of one parameter that lies in this rank's slice of one bucket."""

    param: nn.Parameter
    param_lo: int  # element range inside the flattened parameter
    param_hi: int
    master: torch.Tensor  # view of the parameter buffer (what AdamW updates)


@dataclass
class _Bucket:
    buffer: int  # index into the optimizer's buffers
    start: int  # element range in the buffer (padded to a multiple of DP)
    end: int
    params: list[nn.Parameter]
    pending_grads: int = 0  # grad hooks still to come before the reduce-scatter may start
    grad_work: object | None = None
    param_work: object | None = None

    def shard(self, shard_rank: int, shard_size: int) -> tuple[int, int]:
        """The buffer range that rank `shard_rank` of `shard_size` owns."""
        size = (self.end - self.start) // shard_size
        lo = self.start + shard_rank * size
        return lo, lo + size


@dataclass
class _Buffer:
    dtype: torch.dtype
    params: torch.Tensor
    grads: torch.Tensor
    offsets: dict[int, int] = field(default_factory=dict)  # id(param) -> start element


class DistributedOptimizer:
    """AdamW over `param_groups` (torch's format: dicts with "params" and options such as
    "weight_decay") whose state is sharded over `mesh`'s DP x CP group (over each of its
    optimizer instances when it has several); see the module doc.
    `modules`: the model chunks, whose parameter order (forward order) the buckets follow in
    reverse and whose forwards wait for the overlapped all-gathers (needed for
    overlap_param_gather); `bucket_size`: elements per bucket (Megatron's --ddp-bucket-size).

    Used like a torch optimizer by the step: `zero_grad()`, then backward, then
    `finish_grad_sync()`, `clip_grad_norm_()`, `step()`. `param_groups` are the inner AdamW's
    (one per given group, holding this rank's pieces): setting "lr" there sets the learning rate.
    """

    def __init__(self, param_groups: list[dict], mesh: ParallelMesh, *, lr: float = 1e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8, bucket_size: int | None = None,
                 overlap_grad_reduce: bool = False, overlap_param_gather: bool = False,
                 modules: Iterable[nn.Module] | None = None) -> None:
        self.mesh = mesh
        # Parameters are replicated over DP and CP (context parallelism splits the sequence),
        # so state is sharded, and gradients summed, over the combined DP x CP group: within
        # one optimizer instance (all of DP x CP with one instance), then across instances.
        self.shard_group = _group_or_none(mesh.optimizer_shard_group)
        self.instance_group = _group_or_none(mesh.optimizer_instance_group)
        self.shard_size = mesh.optimizer_shard_size if self.shard_group is not None else 1
        self.shard_rank = mesh.optimizer_shard_rank if self.shard_group is not None else 0
        self.overlap_grad_reduce = overlap_grad_reduce and self.shard_group is not None
        self.overlap_param_gather = overlap_param_gather and self.shard_group is not None
        if bucket_size is None:
            bucket_size = default_bucket_size(mesh.dp_cp_size, overlap_grad_reduce)
        self.params = [p for g in param_groups for p in g["params"]]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter appears in two parameter groups")
        modules = list(modules or [])
        if self.overlap_param_gather and not modules:
            raise ValueError("overlap_param_gather needs the model's modules (their forwards "
                             "wait for the parameter all-gathers)")
        if modules:  # buckets follow the model, so backward fills them one after another
            rank = {id(p): i for i, p in enumerate(p for m in modules for p in m.parameters())}
            self.params.sort(key=lambda p: rank.get(id(p), len(rank)))
        self.buffers: list[_Buffer] = []
        self.buckets: list[_Bucket] = []
        self._build_buffers(bucket_size)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.pieces: dict[int, list[_Piece]] = {id(p): [] for p in self.params}
        groups = []
        for g in param_groups:
            options = {k: v for k, v in g.items() if k != "params"}
            masters = []
            for p in g["params"]:
                for piece in self._owned_pieces(p):
                    self.pieces[id(p)].append(piece)
                    masters.append(piece.master)
            groups.append({"params": masters, **options})
        # (a stage with nothing to train still takes part in the collectives)
        self.optimizer = torch.optim.AdamW(groups or [{"params": []}], lr=lr, betas=betas,
                                           eps=eps, fused=True)
        self.has_state = False  # AdamW has taken a step or loaded state (same on every rank)
        self._expected_backwards = 1
        self._next_launch = 0
        self._hooks = []
        if self.overlap_grad_reduce:
            self._hooks += [p.register_post_accumulate_grad_hook(self._grad_ready)
                            for p in self.params]
        if self.overlap_param_gather:
            self._attach_param_gather_hooks(modules)
        self.zero_grad()

    # -- layout ----------------------------------------------------------------------------
    def _build_buffers(self, bucket_size: int | None) -> None:
        """One parameter buffer and one gradient buffer per dtype; parameters keep their values
        and become views into them."""
        for dtype in dict.fromkeys(p.dtype for p in self.params):
            members = [p for p in reversed(self.params) if p.dtype == dtype]
            spans, start, offset, current = [], 0, 0, []
            offsets = {}
            for i, p in enumerate(members):
                offsets[id(p)] = offset
                offset += p.numel()
                current.append(p)
                if (bucket_size is not None and offset - start >= bucket_size) or \
                        i == len(members) - 1:
                    end = start + _round_up(offset - start, self.shard_size)
                    spans.append((start, end, current))
                    offset, start, current = end, end, []
            device = members[0].device
            buf = _Buffer(dtype, torch.zeros(offset, dtype=dtype, device=device),
                          torch.zeros(offset, dtype=dtype, device=device), offsets)
            with torch.no_grad():
                for p in members:
                    view = buf.params[offsets[id(p)]:offsets[id(p)] + p.numel()].view_as(p)
                    view.copy_(p.detach())
                    p.data = view
            self.buckets += [_Bucket(len(self.buffers), s, e, ps) for s, e, ps in spans]
            self.buffers.append(buf)

    def _range(self, p: nn.Parameter) -> tuple[_Buffer, int, int]:
        buf = self.buffers[self._bucket_of[id(p)].buffer]
        start = buf.offsets[id(p)]
        return buf, start, start + p.numel()

    def _owned_pieces(self, p: nn.Parameter) -> list[_Piece]:
        buf, start, end = self._range(p)
        lo, hi = self._bucket_of[id(p)].shard(self.shard_rank, self.shard_size)
        lo, hi = max(lo, start), min(hi, end)
        if lo >= hi:
            return []
        master = buf.params[lo:hi].detach()
        master.grad = buf.grads[lo:hi]
        return [_Piece(p, lo - start, hi - start, master)]

    def _grad_view(self, p: nn.Parameter) -> torch.Tensor:
        buf, start, end = self._range(p)
        return buf.grads[start:end].view_as(p)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        """The inner AdamW's state (keyed by pieces, not by model parameters)."""
        return self.optimizer.state

    def shard_grads(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, gradient of its owned piece) for every piece on this rank."""
        return [(pc.param, pc.master.grad) for ps in self.pieces.values() for pc in ps]

    def shard_params(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, its owned piece's values) for every piece on this rank: up to date right
        after step(), while the all-gathers of the other pieces may still be in flight."""
        return [(pc.param, pc.master) for ps in self.pieces.values() for pc in ps]

    def state_bytes(self) -> int:
        """Bytes of AdamW state this rank holds (the memory the sharding divides by DP x CP /
        instances)."""
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                   for t in s.values() if torch.is_tensor(t))

    # -- gradients -------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffer (`set_to_none` is ignored: the grads stay buffer views, as
        with DDP's gradient_as_bucket_view) and re-arm the bucket counters. Parameter
        all-gathers still in flight keep going (the forward waits for them)."""
        del set_to_none
        for buf in self.buffers:
            buf.grads.zero_()
        for p in self.params:
            p.grad = self._grad_view(p)
        self.start_grad_sync(self._expected_backwards)

    def start_grad_sync(self, backwards_per_step: int) -> None:
        """Each parameter's gradient is complete after `backwards_per_step` backward passes
        (the micro-batches of a step): the grad hooks count down to it."""
        self._expected_backwards = backwards_per_step
        self._next_launch = 0
        for b in self.buckets:
            b.pending_grads = len(b.params) * backwards_per_step
            b.grad_work = None

    def _grad_ready(self, p: torch.Tensor) -> None:
        bucket = self._bucket_of[id(p)]
        bucket.pending_grads -= 1
        # Launch in bucket order only, so every rank of the instance issues the same
        # collectives in the same order whatever order its hooks fired in.
        while self._next_launch < len(self.buckets) and \
                self.buckets[self._next_launch].pending_grads <= 0:
            self._launch_reduce(self.buckets[self._next_launch], async_op=True)
            self._next_launch += 1

    def _owned_grads(self, bucket: _Bucket) -> torch.Tensor:
        lo, hi = bucket.shard(self.shard_rank, self.shard_size)
        return self.buffers[bucket.buffer].grads[lo:hi]

    def _launch_reduce(self, bucket: _Bucket, async_op: bool) -> None:
        """The in-instance reduce-scatter of one bucket (none when an instance is one rank)."""
        if self.shard_group is None:
            return
        grads = self.buffers[bucket.buffer].grads
        bucket.grad_work = dist.reduce_scatter_tensor(
            self._owned_grads(bucket), grads[bucket.start:bucket.end], group=self.shard_group,
            async_op=async_op)

    def finish_grad_sync(self) -> None:
        """After the step's last backward: each bucket's reduce-scatter is done (launched here
        for those the hooks did not launch), then its owned slice is all-reduced across the
        instances. This rank's owned slices then hold the DP x CP sum."""
        while self._next_launch < len(self.buckets):
            self._launch_reduce(self.buckets[self._next_launch], async_op=self.overlap_grad_reduce)
            self._next_launch += 1
        across = []
        for b in self.buckets:
            if b.grad_work is not None and self.overlap_grad_reduce:
                b.grad_work.wait()
            b.grad_work = None
            if self.instance_group is not None:  # overlaps the later buckets' reduce-scatters
                across.append(dist.all_reduce(self._owned_grads(b), group=self.instance_group,
                                              async_op=self.overlap_grad_reduce))
        for work in across:
            if work is not None:
                work.wait()

    def all_reduce_full_grad(self, p: torch.Tensor | None) -> None:
        """Make `p.grad` the full DP sum on every DP rank (after finish_grad_sync only the owned
        slices hold it): for a gradient that is summed with another stage's copy next (the
        tied word embedding), whose owned slices lie elsewhere in that stage's buffers. Within
        the instance is enough: each instance's slices already hold the whole sum."""
        if p is None or self.shard_group is None:
            return
        flat = p.grad.view(-1)
        keep = torch.zeros_like(flat)
        for pc in self.pieces[id(p)]:
            keep[pc.param_lo:pc.param_hi] = flat[pc.param_lo:pc.param_hi]
        dist.all_reduce(keep, group=self.shard_group)
        flat.copy_(keep)

    def clip_grad_norm_(self, max_norm: float, exclude: Iterable[torch.Tensor] = ()) -> float:
        """The global grad norm (the one the whole model in one process has; `exclude`: tied
        copies counted on another stage), from the owned slices summed over one instance (the
        other instances hold the same slices); clip them by it. Returns the norm before
        clipping."""
        skip = {id(p) for p in exclude}
        sharded, replicated = [], []
        for p, g in self.shard_grads():
            if id(p) in skip:
                continue
            tp_sharded = getattr(p, "tensor_parallel_dim", None) is not None
            (sharded if tp_sharded and self.mesh.tp_size > 1 else replicated).append(g)
        norm = reduce_grad_norm(sharded, replicated, self.mesh, shard_group=self.shard_group)
        if max_norm > 0 and norm == norm and norm != float("inf"):
            coef = max_norm / (norm + 1e-6)
            grads = [g for _, g in self.shard_grads()]
            if coef < 1.0 and grads:
                torch._foreach_mul_(grads, coef)
        return norm

    # -- the update ------------------------------------------------------------------------
    def step(self) -> None:
        """AdamW on the owned slices, then the updated slices to every rank of the
        instance."""
        self.optimizer.step()
        self.has_state = True
        self.start_param_sync()

    def start_param_sync(self) -> None:
        if self.shard_group is None:
            return
        for b in self.buckets:  # the last buckets hold the first layers: gathered first
            params = self.buffers[b.buffer].params
            lo, hi = b.shard(self.shard_rank, self.shard_size)
            b.param_work = dist.all_gather_into_tensor(
                params[b.start:b.end], params[lo:hi], group=self.shard_group,
                async_op=self.overlap_param_gather)
            if not self.overlap_param_gather:
                b.param_work = None

    def finish_param_sync(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Wait for the all-gathers of `params`' buckets (all buckets when None)."""
        buckets = self.buckets if params is None else \
            [self._bucket_of[id(p)] for p in params if id(p) in self._bucket_of]
        for b in buckets:
            if b.param_work is not None:
                b.param_work.wait()
                b.param_work = None

    def _attach_param_gather_hooks(self, modules: list[nn.Module]) -> None:
        """Each module that owns parameters waits for their buckets right before its forward,
        so the gathers overlap the step's tail and the forward of the layers before it."""
        for root in modules:
            for m in root.modules():
                own = [p for p in m.parameters(recurse=False) if id(p) in self._bucket_of]
                if own:
                    self._hooks.append(m.register_forward_pre_hook(
                        lambda _m, _args, own=own: self.finish_param_sync(own)))

    # -- checkpoints -----------------------------------------------------------------------
    def full_param_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """AdamW's state of parameter `p` as torch.optim.AdamW holds it ({} before the first
        step). Collective over the instance: its ranks call it for the same parameters in
        order (every instance holds the same state)."""
        if not self.has_state:
            return {}
        out = {}
        for name in STATE_NAMES:
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            for pc in self.pieces[id(p)]:
                full[pc.param_lo:pc.param_hi] = self.optimizer.state[pc.master][name]
            if self.shard_group is not None:  # each element has one owner in the instance
                dist.all_reduce(full, group=self.shard_group)
            out[name] = full.view_as(p)
        step = torch.zeros((), dtype=torch.float32, device=p.device)
        for pc in self.pieces[id(p)]:
            step = self.optimizer.state[pc.master]["step"].detach().clone()
        if self.shard_group is not None:
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=self.shard_group)
        out["step"] = step
        return out

    def load_param_state(self, p: torch.Tensor, name: str, full: torch.Tensor) -> None:
        """Take this rank's slices of state `name` of parameter `p` from its full tensor."""
        flat = full.reshape(-1) if full.dim() > 0 else full
        for pc in self.pieces[id(p)]:
            state = self.optimizer.state[pc.master]
            if name == "step":
                state["step"] = flat.detach().to(torch.float32, copy=True).to(p.device)
            else:
                state[name] = flat[pc.param_lo:pc.param_hi].to(pc.master.dtype, copy=True)
        self.has_state = True


def _group_or_none(group):
    """A group of more than one rank, else None (nothing to communicate)."""
    return group if group_size(group) > 1 else None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
