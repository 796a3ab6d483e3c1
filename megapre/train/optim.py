"""AdamW with Megatron's decay groups, and the learning-rate schedules.

Weight decay applies to matrices only: biases, norm weights (every 1-D parameter) and anything
named like them are exempt, as in Megatron and nanoGPT. The schedule is a pure function of the
iteration, so resuming at iteration k gives exactly the lr the uninterrupted run had.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from megapre.parallel import layout


# Megatron's "embedding or output" parameters, which --decoupled-lr gives their own lr.
EMBEDDING_OR_OUTPUT = ("embedding.word.weight", "output_layer.weight", "output_word.weight")
QK_NORM_WEIGHTS = ("attention.q_norm.weight", "attention.k_norm.weight")


def param_groups(model: nn.Module, weight_decay: float,
                 decoupled: tuple[float, float] | None = None,
                 decay_qk_norm: bool = False) -> list[dict]:
    """Decay / no-decay groups; with `decoupled` = (max_lr, min_lr) (Megatron's --decoupled-lr
    and --decoupled-min-lr) the word embedding and output layer form groups of their own that
    carry that schedule's bounds (see `set_lr`). `decay_qk_norm`: Megatron's
    --apply-wd-to-qk-layernorm (the query/key norm weights decay like matrices)."""
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or name.endswith(".bias") or "norm" in name.lower()
        if decay_qk_norm and name.endswith(QK_NORM_WEIGHTS):
            exempt = False
        outer = decoupled is not None and name.endswith(EMBEDDING_OR_OUTPUT)
        buckets.setdefault((exempt, outer), []).append(p)
    groups = []
    for exempt, outer in ((False, False), (True, False), (False, True), (True, True)):
        if (exempt, outer) in buckets:
            group = {"params": buckets[exempt, outer],
                     "weight_decay": 0.0 if exempt else weight_decay}
            if outer:
                group["max_lr"], group["min_lr"] = decoupled
            groups.append(group)
    return groups


@dataclass(frozen=True)
class ShardingArgs:
    """How the optimizer state is laid out over DP (the fields of ParallelArgs with these names;
    see megapre.train.args). The number of optimizer instances is not here: it shapes the
    process groups, so the mesh carries it (ParallelConfig.optimizer_instances)."""

    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: int | None = None

    @classmethod
    def of(cls, parallel) -> "ShardingArgs":
        return cls(**{f.name: getattr(parallel, f.name) for f in dataclasses.fields(cls)})


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    eps: float = 1e-8, *, decoupled: tuple[float, float] | None = None,
                    decay_qk_norm: bool = False, sharding: ShardingArgs | None = None):
    """AdamW over the decay / no-decay groups, with torch's fused kernel (CPU and CUDA): one
    pass per parameter group instead of a dozen element-wise ops per tensor (4x faster on the
    CPU for small models), the same element-wise math per parameter whatever the layout.

    `decoupled`: see `param_groups`. `sharding` with `use_distributed_optimizer`: the same AdamW
    with its state sharded over DP (megapre/parallel/distributed_optimizer.py); `model` is then
    a ParallelModel built with `ddp=False`. Its number of optimizer instances is the mesh's
    (--num-distributed-optimizer-instances: the groups are the mesh's)."""
    groups = param_groups(model, weight_decay, decoupled, decay_qk_norm)
    distributed = sharding is not None and sharding.use_distributed_optimizer
    mesh = getattr(model, "mesh", None)
    if mesh is not None:  # instances of a non-distributed optimizer would be plain copies
        layout.optimizer_shard_size(mesh.dp_cp_size, mesh.optimizer_instances, distributed)
    if not distributed:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    from torch.nn.parallel import DistributedDataParallel

    from megapre.parallel.distributed_optimizer import DistributedOptimizer

    if any(isinstance(c, DistributedDataParallel) for c in model.chunks):
        raise ValueError("--use-distributed-optimizer reduces the gradients itself: build the "
                         "model with ParallelModel.build(..., ddp=False)")
    opt = DistributedOptimizer(groups, model.mesh, lr=lr, betas=betas, eps=eps,
                               bucket_size=sharding.ddp_bucket_size,
                               overlap_grad_reduce=sharding.overlap_grad_reduce,
                               overlap_param_gather=sharding.overlap_param_gather,
                               modules=list(model.chunks))
    return opt


@dataclass(frozen=True)
class LRSchedule:
    """lr(iteration), megatron-core's OptimizerParamScheduler to the formula: the update of
    iteration k uses lr * k / warmup while k < warmup (so the first step's lr is 0), then `style`
    from `lr` down to `min_lr` over the remaining `decay_iters - warmup` steps, then `min_lr`.

    WSD (warmup-stable-decay): constant `lr` until the last `wsd_decay_iters` of `decay_iters`,
    then `wsd_style` down to `min_lr`. inverse-square-root: lr * sqrt(warmup / k) after warmup.
    Sample-based runs (--train-samples) give the lengths in iterations as samples / global batch
    (fractions allowed), which is Megatron's samples formula exactly.
    """

    lr: float
    min_lr: float
    warmup: float
    decay_iters: float
    style: str = "linear"
    wsd_decay_iters: float = 0
    wsd_style: str = "linear"

    def __call__(self, it: int) -> float:
        if self.warmup > 0 and it <= self.warmup:
            return self.lr * it / self.warmup
        if self.style == "constant":
            return self.lr
        if it > self.decay_iters:
            return self.min_lr
        if self.style == "inverse-square-root":
            return max(self.min_lr, self.lr * math.sqrt(max(self.warmup, 1) / max(it, 1)))
        if self.style == "WSD":
            start = self.decay_iters - self.wsd_decay_iters
            if it <= start:
                return self.lr
            return self._decay((it - start) / max(self.wsd_decay_iters, 1), self.wsd_style)
        frac = (it - self.warmup) / max(self.decay_iters - self.warmup, 1)
        return self._decay(frac, self.style)

    def _decay(self, frac: float, style: str) -> float:
        frac = min(max(frac, 0.0), 1.0)
        if style == "linear":
            coeff = 1.0 - frac
        elif style == "cosine":
            coeff = 0.5 * (1.0 + math.cos(math.pi * frac))
        elif style == "exponential":
            coeff = 2.0 * 0.5 ** frac - 1.0
        elif style == "minus_sqrt":
            coeff = 1.0 - math.sqrt(frac)
        else:
            raise ValueError(f"unknown lr decay style {style!r}")
        return self.min_lr + (self.lr - self.min_lr) * coeff


def schedule_from_args(optim, train_iters: int, global_batch_size: int | None = None,
                       sample_based: bool = False) -> LRSchedule:
    """Build the schedule from OptimArgs (megapre.train.args). A sample-based run
    (--train-samples) reads --lr-warmup-samples / --lr-decay-samples; an iteration-based one
    the -iters flags, as in Megatron."""
    if sample_based:
        gbs = float(global_batch_size or 1)
        decay = (optim.lr_decay_samples or train_iters * gbs) / gbs
        warmup = optim.lr_warmup_samples / gbs
    else:
        decay = optim.lr_decay_iters or train_iters
        warmup = optim.lr_warmup_iters
    if optim.lr_warmup_fraction is not None:  # Megatron does not round it either
        warmup = optim.lr_warmup_fraction * decay
    return LRSchedule(optim.lr, optim.min_lr, warmup, decay, optim.lr_decay_style,
                      optim.lr_wsd_decay_iters or 0, optim.lr_wsd_decay_style)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, schedule: LRSchedule | None = None,
           iteration: int | None = None) -> None:
    """`lr` for every group; a group with its own bounds (--decoupled-lr) follows `schedule`'s
    shape between them at `iteration`, as megatron-core's scheduler does per group."""
    for group in optimizer.param_groups:
        if "max_lr" in group and schedule is not None:
            group["lr"] = dataclasses.replace(schedule, lr=group["max_lr"],
                                              min_lr=group["min_lr"])(iteration)
        else:
            group["lr"] = lr


# The flags behind each LRSchedule field, for messages.
SCHEDULE_FLAGS = {"lr": "--lr", "min_lr": "--min-lr",
                  "warmup": "--lr-warmup-iters/--lr-warmup-fraction",
                  "decay_iters": "--lr-decay-iters (default --train-iters)",
                  "style": "--lr-decay-style", "wsd_decay_iters": "--lr-wsd-decay-iters",
                  "wsd_style": "--lr-wsd-decay-style"}
OVERRIDE_FLAG = "--override-opt_param-scheduler"
USE_CHECKPOINT_FLAG = "--use-checkpoint-opt_param-scheduler"


def schedule_state(schedule: LRSchedule) -> dict:
    """The schedule as saved with a checkpoint (JSON)."""
    return dataclasses.asdict(schedule)


def schedule_differences(saved: dict, now: LRSchedule) -> list[str]:
    current = schedule_state(now)
    return [f"{SCHEDULE_FLAGS.get(k, k)} {saved[k]!r} (checkpoint) vs {current[k]!r} (now)"
            for k in current if k in saved and saved[k] != current[k]]


def resume_schedule(now: LRSchedule, saved: dict | None, override: bool,
                    use_checkpoint: bool) -> tuple[LRSchedule, str | None]:
    """The schedule a resumed run follows, and a warning: a changed --train-iters or schedule
    flag silently re-stretches the schedule mid-run (the lr jumps), so a difference is either
    chosen explicitly (Megatron's two flags) or warned about loudly."""
    diff = schedule_differences(saved or {}, now)
    if not diff:
        return now, None
    shown = "; ".join(diff)
    if use_checkpoint:
        fields = {f.name for f in dataclasses.fields(LRSchedule)}
        return LRSchedule(**{k: v for k, v in saved.items() if k in fields}), \
            f"lr schedule from the checkpoint ({USE_CHECKPOINT_FLAG}), not the flags: {shown}"
    if override:
        return now, None
    return now, (f"WARNING: the lr schedule differs from the checkpoint's: {shown}; following "
                 f"this command line (the lr jumps where the schedules differ). Pass "
                 f"{USE_CHECKPOINT_FLAG} to continue the checkpoint's schedule, or "
                 f"{OVERRIDE_FLAG} to confirm these flags")
