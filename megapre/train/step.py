"""One optimizer step over a global batch, in any (TP, CP, PP, DP) layout:

    num_microbatches = global_batch / (micro_batch x DP) micro-batches per DP rank
    -> forward + backward of each (pipeline schedule when PP > 1, else gradient accumulation with
       DDP's all-reduce held back until the last micro-batch)
    -> sequence-parallel grad sync (TP) -> tied-embedding grad sync (first + last stage)
    -> global grad norm, clipping -> optimizer step (skipped when the norm is not finite)

With a DistributedOptimizer (megapre/parallel/distributed_optimizer.py) the chunks are not
DDP-wrapped: the optimizer reduce-scatters the gradients instead of DDP's all-reduce, computes
the norm from the owned slices and all-gathers the updated parameters.

Each micro-batch's loss is its share of the global-batch mean (normalized by the loss-mask count
of the whole batch over all DP and CP ranks, megapre/train/losses.py; a CP rank counts and sums
the tokens of its sequence share), so the gradients and the returned loss are exactly those of
one process running the whole batch, whatever the layout. The step owns
what the pure losses leave out: the normalizers of each batch, fp16 loss scaling, and the
per-micro-batch loss parts it sums for logging.

    step = TrainStep(model, torch.optim.AdamW(model.parameters()), StepConfig(4, 64))
    result = step(batch_iter)   # batch_iter yields this DP rank's micro-batch dicts
    result.loss, result.grad_norm, result.parts, result.skipped   # loss, grad_norm = result[:2]
    loss, parts = EvalStep(model, StepConfig(4, 64))(batch_iter)  # forward only
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

from megapre.parallel.comm import group_size
from megapre.parallel.data_parallel import maybe_no_sync
from megapre.parallel.distributed_optimizer import DistributedOptimizer
from megapre.parallel.grads import clip_grad_norm_
from megapre.parallel.layers import sync_sequence_parallel_grads
from megapre.parallel.layout import num_microbatches, resolve_schedule
from megapre.parallel.pipeline import PipelineRunner, sync_tied_embedding_grads

from .loss_scale import DynamicLossScaler
from .losses import Normalizers, Parts
from .parallel_model import ParallelModel
from .rerun import Halt, RerunMachine
from .stages import MicroBatch


@dataclass(frozen=True)
class StepConfig:
    micro_batch_size: int
    global_batch_size: int
    clip_grad: float = 1.0  # 0 = no clipping (the norm is still computed and returned)
    pipeline_schedule: str | None = None  # gpipe | 1f1b | interleaved-1f1b; None = by layout

    def num_microbatches(self, dp_size: int) -> int:
        return num_microbatches(self.micro_batch_size, self.global_batch_size, dp_size)


class StepResult(NamedTuple):
    loss: float  # global-batch mean loss (BERT: masked-LM + sentence-order)
    grad_norm: float  # global L2 norm before clipping
    parts: dict[str, float]  # loss components (GPT: 'lm loss'; BERT: + 'sop loss')
    skipped: bool  # optimizer step skipped (non-finite grad norm, or halted)
    halt: Halt | None = None  # --rerun-mode: save (maybe) and exit instead of updating


class TrainStep:
    """Callable: `step(batch_iter) -> StepResult` (loss, grad_norm, parts, skipped); the same
    values on every rank."""

    def __init__(self, model: ParallelModel, optimizer: torch.optim.Optimizer,
                 config: StepConfig, loss_scaler: DynamicLossScaler | None = None) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self.mesh = mesh = model.mesh
        self.adapter = model.adapter
        self.loss_scaler = loss_scaler
        self.num_microbatches = config.num_microbatches(mesh.dp_size)
        # The batch in flight: its loss normalizers, the factor the loss is multiplied by before
        # backward (the fp16 loss scale when training, else 1), and the parts of each
        # micro-batch's loss (the pipeline calls `_loss` on the last stage only).
        self._norm = Normalizers(1.0, 1.0)
        self._scale = 1.0
        self._parts: list[Parts] = []
        self.rerun: RerunMachine | None = None  # --rerun-mode (set by the training loop)
        self._validating = False
        self.pipeline: PipelineRunner | None = None
        self._pipelines: dict[int, PipelineRunner] = {}
        self._schedule = resolve_schedule(config.pipeline_schedule, mesh.pp_size,
                                          mesh.virtual_pipeline)
        self.pipeline = self._pipeline(self.num_microbatches)

    def _pipeline(self, num_microbatches: int) -> PipelineRunner | None:
        """The pipeline schedule for this many micro-batches (one per count, built once)."""
        if self._schedule is None:
            return None
        if num_microbatches not in self._pipelines:
            first, hidden, last = self.adapter.examples(self.config.micro_batch_size)
            self._pipelines[num_microbatches] = PipelineRunner(
                list(self.model.chunks), self.model.specs, self.mesh, self._schedule,
                num_microbatches, self._loss, first, hidden, last)
        return self._pipelines[num_microbatches]

    def set_global_batch_size(self, global_batch_size: int) -> None:
        """The next steps' global batch (--step-batch-size-schedule changes it mid-run)."""
        self.num_microbatches = num_microbatches(self.config.micro_batch_size, global_batch_size,
                                                 self.mesh.dp_size)
        self.pipeline = self._pipeline(self.num_microbatches)

    def _loss(self, output, target) -> torch.Tensor:
        """One micro-batch's loss share, recorded for logging (and checked under --rerun-mode)
        and scaled for backward."""
        loss, parts = self.adapter.loss(output, target, self._norm)
        self._parts.append(parts)
        if self._validating:
            self.rerun.check_loss(float(loss.detach()))
        return loss * self._scale if self._scale != 1.0 else loss

    # -- the step ---------------------------------------------------------------------------
    def __call__(self, batch_iter: Iterator[dict[str, torch.Tensor]]) -> StepResult:
        mbs = self._prepare(batch_iter, train=True)
        sharded = self.optimizer if isinstance(self.optimizer, DistributedOptimizer) else None
        runs = self.rerun.runs() if self.rerun is not None else range(1)
        for _ in runs:  # --rerun-mode runs a step again, same batch, same random streams
            parts, grad_norm = self._gradients(mbs, sharded)
        loss, named = self._reduce_loss(parts)
        halt = self.rerun.halt() if self.rerun is not None else None
        if halt is not None:  # no update: the step is saved (maybe) and re-run after a restart
            return StepResult(loss, grad_norm, named, True, halt)
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow=skipped)
        return StepResult(loss, grad_norm, named, skipped)

    def _gradients(self, mbs: list[MicroBatch], sharded: DistributedOptimizer | None
                   ) -> tuple[dict[str, torch.Tensor], float]:
        """Forward and backward of the micro-batches, gradient syncs, global norm and clipping:
        the step up to the update. Returns this rank's loss parts and the grad norm."""
        self.optimizer.zero_grad(set_to_none=True)
        if sharded is not None:
            sharded.start_grad_sync(self.num_microbatches)
        if self.pipeline is not None:
            self.pipeline.run([m.first_args for m in mbs], [m.kwargs for m in mbs],
                              [m.target for m in mbs])
        else:
            self._accumulate(mbs)
        parts = self._take_parts()

        params = [p for p in self.model.parameters() if p.requires_grad]
        if sharded is not None:
            sharded.finish_grad_sync()
        if self.loss_scaler is not None:
            self.loss_scaler.unscale_(params)
        for model in self.model.models:
            sync_sequence_parallel_grads(model, self.mesh)
        tied = self.model.tied_embedding_weight()
        if sharded is not None:
            sharded.all_reduce_full_grad(tied)
        sync_tied_embedding_grads(tied, self.mesh)
        if sharded is not None:
            grad_norm = sharded.clip_grad_norm_(self.config.clip_grad,
                                                exclude=self.model.tied_copies())
        else:
            grad_norm = clip_grad_norm_(params, self.config.clip_grad, self.mesh,
                                        exclude=self.model.tied_copies())
        # fp16 overflows are the loss scaler's to handle, not a fault to attribute
        if self.rerun is not None and self.loss_scaler is None:
            self.rerun.check_grad_norm(grad_norm)
        return parts, grad_norm

    @torch.no_grad()
    def evaluate(self, batch_iter: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Forward-only loss of one global batch (same micro-batching, same normalization as
        training; dropout off). Returns {'loss': ..., 'lm loss': ..., ['sop loss': ...]} on every
        rank; `normalizers` then holds the batch's global (tokens, samples)."""
        mbs = self._prepare(batch_iter, train=False)
        if self.pipeline is not None:
            self.pipeline.evaluate([m.first_args for m in mbs], [m.kwargs for m in mbs],
                                   [m.target for m in mbs])
        else:
            for mb in mbs:
                self._loss(self.model.chunks[0](*mb.first_args, **mb.kwargs), mb.target)
        loss, named = self._reduce_loss(self._take_parts())
        return {"loss": loss, **named}

    @property
    def normalizers(self) -> Normalizers:
        """The global (tokens, samples) of the batch the step ran last."""
        return self._norm

    def _prepare(self, batch_iter: Iterator[dict[str, torch.Tensor]], train: bool
                 ) -> list[MicroBatch]:
        """Take this step's micro-batches, compute the loss normalizers of the global batch, and
        put the chunks in train or eval mode."""
        mbs = self._take(batch_iter)
        counts = self.adapter.local_counts(mbs).to(self.mesh.device)  # nccl: device tensors
        if group_size(self.mesh.dp_cp_group) > 1:
            dist.all_reduce(counts, group=self.mesh.dp_cp_group)
        self._norm = self.adapter.normalizers(counts)
        self._scale = self.loss_scaler.scale if (train and self.loss_scaler is not None) else 1.0
        self._validating = train and self.rerun is not None
        self._parts = []
        for chunk in self.model.chunks:
            chunk.train(train)
        return mbs

    def _take_parts(self) -> dict[str, torch.Tensor]:
        """This rank's loss parts of the batch, summed over its micro-batches."""
        names = {n for p in self._parts for n in p}
        out = {n: torch.stack([p[n] for p in self._parts if n in p]).sum() for n in names}
        self._parts = []
        return out

    def _take(self, batch_iter: Iterator[dict[str, torch.Tensor]]) -> list[MicroBatch]:
        mbs = []
        for i in range(self.num_microbatches):
            try:
                mb = next(batch_iter)
            except StopIteration:
                raise RuntimeError(
                    f"the batch iterator ran out after {i} of {self.num_microbatches} "
                    "micro-batches of this step (train samples exhausted: lower --train-iters "
                    "or add data)") from None
            split = self.adapter.split(mb)
            b, s = split.first_args[0].shape[:2]
            s *= self.mesh.cp_size  # the split kept this CP rank's share of the sequence
            if b != self.config.micro_batch_size:
                raise ValueError(f"micro-batch {i} has {b} samples, expected "
                                 f"--micro-batch-size {self.config.micro_batch_size}")
            if self.pipeline is not None and s != self.adapter.cfg.seq_length:
                # the stages' receive buffers are sized for [seq_length, micro-batch, hidden]
                raise ValueError(f"micro-batch {i} has sequences of {s} tokens; with pipeline "
                                 f"parallelism every sample must have --seq-length "
                                 f"{self.adapter.cfg.seq_length} tokens (pad them)")
            mbs.append(split)
        return mbs

    def _accumulate(self, mbs: list[MicroBatch]) -> None:
        """Gradient accumulation without a pipeline: DDP reduces only on the last backward."""
        chunk = self.model.chunks[0]
        for i, mb in enumerate(mbs):
            with maybe_no_sync(self.model.chunks, skip_sync=i < len(mbs) - 1):
                out = chunk(*mb.first_args, **mb.kwargs)
                self._loss(out, mb.target).backward()

    def _reduce_loss(self, parts: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        """Sum this rank's loss shares over DP x CP, then hand the last stage's value to every
        pipeline rank (others contribute zeros)."""
        names = sorted(self._expected_parts())  # same list on every rank
        dev = self.mesh.device
        vec = torch.stack([parts[n].to(dev, torch.float64) if n in parts
                           else torch.zeros((), dtype=torch.float64, device=dev) for n in names])
        if self.mesh.is_last_stage and group_size(self.mesh.dp_cp_group) > 1:
            dist.all_reduce(vec, group=self.mesh.dp_cp_group)
        if group_size(self.mesh.pp_group) > 1:
            if not self.mesh.is_last_stage:
                vec.zero_()
            dist.all_reduce(vec, group=self.mesh.pp_group)
        named = {n: float(v) for n, v in zip(names, vec.cpu())}
        return self.adapter.total(named), named

    def _expected_parts(self) -> set[str]:
        return self.adapter.part_names()


class EvalStep:
    """`evaluator(batch_iter) -> (loss, parts)` over one global batch, same on every rank: a
    forward-only TrainStep (same micro-batching, loss normalization and pipeline schedule), so a
    validation loss is comparable to the training loss of the same batch."""

    def __init__(self, model: ParallelModel, config: StepConfig,
                 step: TrainStep | None = None) -> None:
        # An evaluator needs no optimizer; reuse the training step's machinery when given.
        self.step = step if step is not None else TrainStep(model, None, config)
        self.model, self.mesh = model, model.mesh

    def __call__(self, batch_iter: Iterator[dict[str, torch.Tensor]]
                 ) -> tuple[float, dict[str, float]]:
        result = dict(self.step.evaluate(batch_iter))
        loss = result.pop("loss")
        return loss, result

    @property
    def normalizers(self) -> Normalizers:
        """The global (tokens, samples) of the batch evaluated last."""
        return self.step.normalizers
