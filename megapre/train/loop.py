"""The pretraining loop: set-up from one PretrainConfig, then steps, logging, evaluation,
checkpoints and a clean exit on SIGTERM or a time limit.

    run = Trainer(cfg)            # tokenizer, mesh, model, optimizer, data, resume
    summary = run.train()         # -> {"iteration", "train_loss", "valid_loss", "test_loss", ...}

Decisions that must be the same on every rank (stop because of a signal or the clock, too many
skipped steps) are all-reduced, so no rank leaves a collective behind.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megapre.parallel.distributed_optimizer import DistributedOptimizer
from megapre.parallel.param_stats import global_param_norm, global_zeros_in_grad

from . import banner, distill
from .args import PretrainConfig, RunPlan, batch_schedule, decoupled_bounds, recompute_spec
from .data import batches, build_splits
from .gc_control import ManualGC
from .loss_scale import DynamicLossScaler
from .metrics import (MetricsLogger, device_peak_tflops, eval_record, flops_per_token,
                      format_eval_line, format_train_line, memory_stats, throughput)
from .optim import ShardingArgs, build_optimizer, schedule_from_args, set_lr
from .runtime import build_runtime
from .step import EvalStep, StepConfig, TrainStep
from .stop_flag import StopFlag, agreed_stop

_StopFlag = StopFlag  # the name tests and older code import


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_total: int = 0
    skipped_samples: int = 0  # samples of skipped steps: they do not advance the lr schedule
    skipped_in_a_row: int = 0
    extra: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: PretrainConfig, planned: tuple[Any, RunPlan] | None = None) -> None:
        """`planned`: banner.plan_run's (tokenizer, plan) when the caller already checked the
        config (and printed its banner) before importing torch."""
        self.start_time = time.time()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        tokenizer, self.plan = planned or banner.plan_run(cfg, world)
        self.cfg = cfg = self.plan.config
        rt = build_runtime(cfg, tokenizer=tokenizer, virtual_pipeline=self.plan.virtual_pipeline,
                           recompute_granularity=recompute_spec(cfg.train),
                           context_parallel=True, adapter=distill.lm_adapter(cfg))
        self.tokenizer, self.mesh, self.tracker = rt.tokenizer, rt.mesh, rt.tracker
        self.model_cfg, self.model, self.device = rt.model_cfg, rt.model, rt.device
        self._banner_model()
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, o.weight_decay,
                                         (o.adam_beta1, o.adam_beta2), o.adam_eps,
                                         decoupled=decoupled_bounds(o),
                                         decay_qk_norm=o.apply_wd_to_qk_layernorm,
                                         sharding=ShardingArgs.of(cfg.parallel))
        self.schedule = schedule_from_args(o, cfg.train.train_iters, cfg.train.global_batch_size,
                                           cfg.train.train_samples is not None)
        step_cfg = StepConfig(cfg.train.micro_batch_size, cfg.train.global_batch_size,
                              cfg.train.clip_grad, self.plan.pipeline_schedule)
        self.loss_scaler = _loss_scaler(cfg.train)
        self.step = TrainStep(self.model, self.optimizer, step_cfg, loss_scaler=self.loss_scaler)
        self.evaluator = EvalStep(self.model, step_cfg, step=self.step)
        self.rerun = self._rerun_machine()
        self.step.rerun = self.rerun
        self.state = TrainState()
        t = cfg.train
        self.gc = ManualGC(t.manual_gc, t.manual_gc_interval, t.manual_gc_eval)
        self.batch_sizes = batch_schedule(cfg)  # --step-batch-size-schedule, or None
        self.splits = build_splits(cfg, self.tokenizer, group=None)
        banner.emit(banner.data_lines(self.splits, cfg.train.train_iters * self.plan.global_batch_size
                                  * cfg.model.seq_length))
        owner = (self.mesh.is_last_stage and self.mesh.tp_rank == 0 and self.mesh.dp_rank == 0
                 and self.mesh.cp_rank == 0)
        self.logger = MetricsLogger(owner, cfg.log.metrics_path, cfg.log.tensorboard_dir,
                                    cfg.log.wandb_project, cfg.log.wandb_exp_name, cfg.to_dict(),
                                    wandb_entity=cfg.log.wandb_entity,
                                    wandb_dir=cfg.log.wandb_save_dir)
        self.peak, self.peak_source = device_peak_tflops(self.device)
        self.flops_token = flops_per_token(
            self.model_cfg, cfg.model.seq_length,
            predicted_fraction=cfg.data.mask_prob if cfg.model.model == "bert" else 1.0)
        self.stop = StopFlag()
        self.stop.install()
        # Last: nothing after a restored checkpoint may draw from the global generators, or the
        # resumed run's dropout masks would be off by those draws.
        self._maybe_load()

    def _banner_model(self) -> None:
        from megapre.launch.memory import total_params
        from megapre.model.attention_core import resolve_backend

        m = self.cfg.model
        total = total_params(self.model_cfg, m.model, m.bert_binary_head)[0]
        on_rank = sum(p.numel() for p in self.model.parameters())
        masked = m.model == "bert" or self.cfg.data.reset_attention_mask
        backend = ("ring (context parallel)" if self.mesh.cp_size > 1 else
                   resolve_backend(m.attention_backend, self.device.type,
                                   m.attention_dropout > 0, masked))
        banner.emit(banner.model_lines(total, on_rank, self.device, backend))

    # -- checkpoints ------------------------------------------------------------------------
    def _maybe_load(self) -> None:
        """Lock --save, then resume from --load. Sets `self.load_info` (for the banner and the
        summary): {"load", "resumed_from" (checkpoint path or None), "resumed_iteration",
        "started_from_scratch", "finetune"}."""
        c = self.cfg.checkpoint
        self.load_info = {"load": c.load, "resumed_from": None, "resumed_iteration": None,
                          "started_from_scratch": True, "finetune": c.finetune}
        self.save_lock = self._lock_save_dir() if c.save else None
        try:
            self._load(c)
            if self.rerun is not None and self.rerun.phase == 0:
                self.rerun.iteration = self.state.iteration
        except BaseException:
            if self.save_lock is not None:
                self.save_lock.release()
            raise

    def _lock_save_dir(self):
        import weakref

        from .checkpoint_lock import lock_save_dir

        lock, notes = lock_save_dir(self.cfg.checkpoint.save, self.device)
        for note in notes:
            self._print(f"WARNING: {note}")
        if lock is not None:
            weakref.finalize(self, lock.release)
        return lock

    def _load(self, c) -> None:
        if not c.load:
            return
        from .checkpoint import find_latest, load_checkpoint, read_meta
        from .checkpoint_tokenizer import check_tokenizer

        path = find_latest(c.load)
        if path is None:
            return self._no_checkpoint(c)
        note = check_tokenizer(read_meta(path).get("tokenizer"), self.tokenizer,
                               self.cfg.data.allow_tokenizer_mismatch, str(path))
        if note:
            self._print(f"WARNING: {note}")
        info = load_checkpoint(path, self.model, None if c.no_load_optim or c.finetune
                               else self.optimizer, self.mesh,
                               load_rng=not (c.no_load_rng or c.finetune), tracker=self.tracker,
                               strictness=c.dist_ckpt_strictness)
        if not c.finetune:
            self.state.iteration = int(info["iteration"])
            self.state.consumed_samples = int(info["consumed_samples"])
            extra = info.get("extra", {}) or {}
            self.state.skipped_total = int(extra.get("skipped_total", 0))
            self.state.skipped_samples = int(extra.get(
                "skipped_samples", self.state.skipped_total * self.cfg.train.global_batch_size))
            if self.loss_scaler is not None and extra.get("loss_scaler"):
                self.loss_scaler.load_state_dict(extra["loss_scaler"])
            self._resume_schedule(extra.get("lr_schedule"))
            self._resume_rerun(extra.get("rerun"))
        self.load_info.update(resumed_from=str(info["path"]), started_from_scratch=False,
                              resumed_iteration=int(info["iteration"]))
        self._print(f"loaded checkpoint {info['path']} at iteration {info['iteration']}")

    def _no_checkpoint(self, c) -> None:
        """Megatron starts fresh when --load holds nothing; a flag that only means something
        when loading says the user expected a checkpoint."""
        from megapre.errors import ConfigError

        why = "no such directory" if not os.path.isdir(c.load) else "it holds no checkpoint"
        asked = [f for f, on in (("--finetune", c.finetune), ("--no-load-optim", c.no_load_optim),
                                 ("--no-load-rng", c.no_load_rng)) if on]
        if asked:
            raise ConfigError(f"--load {c.load}: {why}, but {' and '.join(asked)} asks to load "
                              "a checkpoint; fix the path, or drop the flag to start from scratch")
        self._print(f"WARNING: --load {c.load}: {why}; STARTING FROM SCRATCH at iteration 0 "
                    "(a typo in --load? check the path)")

    def _resume_schedule(self, saved: dict | None) -> None:
        from .optim import USE_CHECKPOINT_FLAG, resume_schedule

        c = self.cfg.checkpoint
        if saved is None and c.use_checkpoint_opt_param_scheduler:
            self._print(f"WARNING: {USE_CHECKPOINT_FLAG}: the checkpoint records no lr schedule "
                        "(saved by an older megapre); following the schedule flags")
        self.schedule, note = resume_schedule(self.schedule, saved,
                                              c.override_opt_param_scheduler,
                                              c.use_checkpoint_opt_param_scheduler)
        if note:
            self._print(note)

    def save(self) -> None:
        c = self.cfg.checkpoint
        if not c.save:
            return
        from .checkpoint import save_checkpoint
        from .optim import schedule_state

        save_checkpoint(c.save, self.state.iteration, self.model, self.optimizer, self.mesh,
                        consumed_samples=self.state.consumed_samples,
                        config=self.cfg.to_dict(), tracker=self.tracker,
                        extra={"skipped_total": self.state.skipped_total,
                               "skipped_samples": self.state.skipped_samples,
                               "loss_scaler": (self.loss_scaler.state_dict()
                                               if self.loss_scaler is not None else None),
                               "lr_schedule": schedule_state(self.schedule),
                               "rerun": self._rerun_state()},
                        async_save=c.async_save, keep_last=c.keep_last,
                        retain_interval=c.save_retain_interval,
                        tokenizer=self.tokenizer.describe())
        self._print(f"saved checkpoint at iteration {self.state.iteration} to {c.save}")

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        t = cfg.train
        moved = self.logger.start(resumed=st.iteration > 0)
        if moved:
            self._print(moved)
        data = self._batches(self.splits.train, st.consumed_samples)
        summary: dict[str, Any] = {"start_iteration": st.iteration,
                                   "started_from": self._started_from()}
        window = _Window()
        exit_reason = "finished"
        while st.iteration < t.train_iters:
            # As megatron-core's scheduler, which counts samples and only steps on successful
            # updates: skipped steps (fp16 overflow, NaN) do not advance the lr schedule
            done = (st.consumed_samples - st.skipped_samples) / t.global_batch_size
            lr = self.schedule(done)
            set_lr(self.optimizer, lr, self.schedule, done)
            t0 = time.perf_counter()
            scale_before = self.loss_scaler.scale if self.loss_scaler is not None else None
            batch = (self.batch_sizes.at(st.consumed_samples) if self.batch_sizes
                     else t.global_batch_size)
            self.step.set_global_batch_size(batch)
            with self._autocast():
                result = self.step(data)
            if result.halt is not None:
                self._halt(result.halt)
            st.iteration += 1
            st.consumed_samples += batch
            self._account_skip(result.skipped, scale_before, batch)
            self.gc.after_step(st.iteration)
            window.add(result, time.perf_counter() - t0, batch * cfg.model.seq_length)
            summary["train_loss"] = result.loss
            if st.iteration % cfg.log.log_interval == 0 or st.iteration == t.train_iters:
                self._log_train(window.take(), lr)
                if self.rerun is not None and self.rerun.mode == "report_stats":
                    self._report_determinism()
            if self.splits.valid is not None and t.eval_iters > 0 and \
                    st.iteration % t.eval_interval == 0:
                summary["valid_loss"] = self._evaluate("valid")
            if cfg.checkpoint.save_interval and st.iteration % cfg.checkpoint.save_interval == 0:
                self.save()
            reason = self._should_exit()
            if reason:
                exit_reason = reason
                break
        if exit_reason == "finished":
            if self.splits.valid is not None and t.eval_iters > 0 and \
                    st.iteration % t.eval_interval != 0:
                summary["valid_loss"] = self._evaluate("valid")
            if self.splits.test is not None and t.eval_iters > 0:
                summary["test_loss"] = self._evaluate("test")
        if cfg.checkpoint.save and (exit_reason != "finished" or
                                    not cfg.checkpoint.save_interval or
                                    st.iteration % cfg.checkpoint.save_interval):
            self.save()
        elif exit_reason != "finished" and not cfg.checkpoint.save:
            self._print(f"{exit_reason}: no --save directory was given, so nothing was saved "
                        f"(iteration {st.iteration} is lost)")
        self.gc.close()
        summary.update(iteration=st.iteration, consumed_samples=st.consumed_samples,
                       skipped_iters=st.skipped_total, exit_reason=exit_reason,
                       elapsed_s=time.time() - self.start_time)
        self.logger.close()
        return summary

    def _started_from(self) -> str:
        """For the summary: the checkpoint resumed, or why the run started from scratch."""
        info = self.load_info
        if info["resumed_from"]:
            return info["resumed_from"] + (" (--finetune: weights only)" if info["finetune"] else "")
        return f"scratch (--load {info['load']} held no checkpoint)" if info["load"] else "scratch"

    def _batches(self, dataset, consumed: int) -> Iterator[dict[str, torch.Tensor]]:
        return batches(dataset, consumed, self.cfg, self.mesh.dp_rank, self.mesh.dp_size,
                       self.device)

    def _autocast(self):
        if self.cfg.train.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.cfg.train.fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _account_skip(self, skipped: bool, scale_before: float | None = None,
                      samples: int = 0) -> None:
        """Count a skipped step; too many in a row stop the run. An fp16 overflow that made the
        loss scaler back off is the scaler finding its level (from Megatron's 2^32 that takes
        a few dozen steps), not divergence: it is reported but not counted."""
        st = self.state
        if not skipped:
            st.skipped_in_a_row = 0
            return
        st.skipped_total += 1
        st.skipped_samples += samples
        scaler = self.loss_scaler
        if scaler is not None and scale_before is not None and scale_before > scaler.min_scale:
            st.skipped_in_a_row = 0
            self._print(f"iteration {st.iteration}: fp16 gradients overflowed at loss scale "
                        f"{scale_before:g}; step skipped, scale now {scaler.scale:g}")
            return
        st.skipped_in_a_row += 1
        self._print(f"iteration {st.iteration}: loss or gradients not finite; step skipped "
                    f"({st.skipped_in_a_row} in a row)")
        if st.skipped_in_a_row > self.cfg.train.max_skipped_iters:
            raise RuntimeError(
                f"{st.skipped_in_a_row} consecutive steps had NaN/inf loss or gradients "
                f"(--max-skipped-iters {self.cfg.train.max_skipped_iters}); the run diverged: "
                "lower --lr, raise --lr-warmup-iters, or check the data")

    def _evaluate(self, split: str) -> float:
        dataset = getattr(self.splits, split)
        t = self.cfg.train
        # --eval-global-batch-size, else the nominal batch (not a schedule's smaller size)
        gbs = t.eval_global_batch_size or t.global_batch_size
        self.step.set_global_batch_size(gbs)
        # Each evaluation reads its own fresh window of the split: evaluation k at iteration i
        # starts where the previous ones stopped, as Megatron's validation iterator does.
        start = 0 if split == "test" else \
            (self.state.iteration // t.eval_interval - 1) * t.eval_iters * gbs
        start = max(start, 0) % max(len(dataset) - t.eval_iters * gbs + 1, 1)
        data = batches(dataset, start, self.cfg, self.mesh.dp_rank, self.mesh.dp_size,
                       self.device, num_workers=0)
        total, parts_sum = 0.0, {}
        with self._autocast(), self.gc.evaluation():
            for _ in range(t.eval_iters):
                loss, parts = self.evaluator(data)
                total += loss
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
        loss = total / t.eval_iters
        record = eval_record(self.state.iteration, split, loss,
                             {k: v / t.eval_iters for k, v in parts_sum.items()})
        self.logger.log(record, console=format_eval_line(record))
        return loss

    # -- --rerun-mode ---------------------------------------------------------------------------
    def _rerun_machine(self):
        """Megatron's rerun state machine, or None (--rerun-mode disabled costs nothing)."""
        t = self.cfg.train
        if t.rerun_mode == "disabled":
            return None
        from . import rng_state
        from .rerun import RerunConfig, RerunMachine

        cfg = RerunConfig(t.rerun_mode, t.check_for_nan_in_loss_and_grad, t.check_for_spiky_loss,
                          t.check_for_large_grads, t.error_injection_rate, t.error_injection_type,
                          t.result_rejected_tracker_filename)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return RerunMachine(cfg, rank, self._any_rank,
                            capture=lambda: rng_state.capture(self.mesh, self.tracker),
                            restore=lambda s: rng_state.restore(s, self.mesh, self.tracker),
                            log=lambda text: print(f"[megapre] {text}", flush=True))

    def _any_rank(self, flags: list[bool]) -> list[bool]:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _layout(self) -> list[int]:
        m = self.mesh
        return [m.world_size, m.tp_size, m.pp_size, m.dp_size, m.cp_size]

    def _rerun_state(self) -> dict | None:
        """Every rank's rerun state, gathered into the checkpoint's metadata (collective)."""
        if self.rerun is None:
            return None
        return {"mode": self.rerun.mode, "layout": self._layout(),
                "ranks": _gather(self.rerun.state_dict())}

    def _resume_rerun(self, saved: dict | None) -> None:
        from .rerun import Phase

        pending = saved is not None and any(r["phase"] != Phase.IDLE for r in saved["ranks"])
        if self.rerun is None:
            if pending:
                self._print("WARNING: the checkpoint waits for a re-run of its next step, but "
                            "--rerun-mode is disabled: the saved rerun state is ignored")
            return
        if saved is None:
            return
        if saved["layout"] != self._layout():
            self._print("WARNING: the parallel layout changed since the checkpoint (world, TP, "
                        f"PP, DP, CP {saved['layout']} -> {self._layout()}): its rerun state is "
                        "ignored")
            return
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.rerun.load_state_dict(saved["ranks"][rank])
        if pending:
            self._print(f"re-running iteration {self.rerun.iteration} from the checkpoint to "
                        "settle the diagnosis of its unexpected result")

    def _halt(self, halt) -> None:
        """Save the state before the step when asked, then exit with Megatron's code."""
        from .rerun import EXIT_FAILED_VALIDATION, Halt, RerunExit

        if halt.checkpoint and not self.cfg.checkpoint.save:
            halt = Halt(EXIT_FAILED_VALIDATION, False,
                        "no --save directory to keep the step for a re-run on other hardware; "
                        "exiting without updating the weights")
        if halt.checkpoint:
            self.save()
        self._print(f"--rerun-mode {self.cfg.train.rerun_mode}: {halt.message} "
                    f"(exit code {halt.exit_code})")
        raise RerunExit(halt)

    def _report_determinism(self) -> None:
        """--rerun-mode report_stats: how far re-runs differed, over all ranks (collective)."""
        stats = _gather(self.rerun.take_stats())
        merged: dict[str, dict[str, float]] = {}
        for rank_stats in stats:
            for check, s in rank_stats.items():
                m = merged.setdefault(check, {"count": 0, "sum": 0.0, "max": 0.0})
                m["count"] += s["count"]
                m["sum"] += s["mean"] * s["count"]
                m["max"] = max(m["max"], s["max"])
        for check, m in sorted(merged.items()):
            mean = m["sum"] / m["count"] if m["count"] else 0.0
            self._print(f"determinism at iteration {self.state.iteration}: '{check}': "
                        f"{m['count']} re-runs, relative difference mean {mean:.3g} max "
                        f"{m['max']:.3g}")

    def _log_train(self, w: dict, lr: float) -> None:
        tp = throughput(w["tokens"], w["seconds"], self.flops_token, self.mesh.world_size, self.peak)
        step_s = w["seconds"] / max(w["steps"], 1)
        record = {"iteration": self.state.iteration, "train_iters": self.cfg.train.train_iters,
                  "consumed_samples": self.state.consumed_samples, "loss": w["loss"], "lr": lr,
                  "grad_norm": w["grad_norm"], "skipped_iters": self.state.skipped_total,
                  "tokens_per_s": tp.tokens_per_s, "tflops_per_device": tp.tflops_per_device,
                  "mfu": tp.mfu, "step_time_s": step_s, "elapsed_s": time.time() - self.start_time,
                  "eta_s": step_s * (self.cfg.train.train_iters - self.state.iteration),
                  **{k.replace(" ", "_"): v for k, v in w["parts"].items()},
                  **memory_stats(self.device)}
        if self.loss_scaler is not None:
            record["loss_scale"] = self.loss_scaler.scale
        record.update(self._model_stats())
        self.logger.log(record, console=format_train_line(record))

    def _model_stats(self) -> dict[str, float]:
        """--log-params-norm / --log-num-zeros-in-grad (collectives: every rank calls this)."""
        log, out = self.cfg.log, {}
        params = [p for p in self.model.parameters() if p.requires_grad]
        sharded = self.optimizer if isinstance(self.optimizer, DistributedOptimizer) else None
        if log.log_params_norm:
            out["params_norm"] = global_param_norm(params, self.mesh, self.model.tied_copies(),
                                                   sharded)
        if log.log_num_zeros_in_grad:
            out["num_zeros_in_grad"] = global_zeros_in_grad(params, self.mesh,
                                                            self.model.tied_copies(), sharded)
        return out

    def _should_exit(self) -> str | None:
        t = self.cfg.train
        reason = agreed_stop(
            self.stop.signum,
            t.exit_duration_in_mins is not None and
            time.time() - self.start_time > 60 * t.exit_duration_in_mins,
            t.exit_interval is not None and self.state.iteration % t.exit_interval == 0,
            self.device)
        if reason:
            self._print(f"stopping at iteration {self.state.iteration}: {reason}")
        return reason

    def _print(self, text: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[megapre] {text}", flush=True)

    def close(self) -> None:
        self.gc.close()
        if self.cfg.checkpoint.save:
            from .checkpoint import wait_for_pending_save

            wait_for_pending_save()  # an --async-save still writing would be lost otherwise
        if self.save_lock is not None:
            self.save_lock.release()
        self.stop.restore()
        self.mesh.destroy()


class _Window:
    """Sums between two log lines."""

    def __init__(self) -> None:
        self.take()

    def add(self, result, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        if not result.skipped:
            self.loss_sum += result.loss
            self.counted += 1
            for k, v in result.parts.items():
                self.parts[k] = self.parts.get(k, 0.0) + v
        self.grad_norm = result.grad_norm

    def take(self) -> dict:
        out = {}
        if getattr(self, "steps", 0):
            n = max(self.counted, 1)
            out = {"steps": self.steps, "seconds": self.seconds, "tokens": self.tokens,
                   "loss": self.loss_sum / n if self.counted else float("nan"),
                   "grad_norm": self.grad_norm, "parts": {k: v / n for k, v in self.parts.items()}}
        self.steps, self.seconds, self.tokens, self.loss_sum, self.counted = 0, 0.0, 0, 0.0, 0
        self.parts, self.grad_norm = {}, float("nan")
        return out


def _loss_scaler(t) -> DynamicLossScaler | None:
    """fp16's loss scaler from Megatron's flags (None without --fp16)."""
    if not t.fp16:
        return None
    if t.loss_scale is not None:
        return DynamicLossScaler.static(t.loss_scale)
    return DynamicLossScaler(t.initial_loss_scale, t.loss_scale_window,
                             min_scale=t.min_loss_scale, hysteresis=t.hysteresis)


def _gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, by rank (collective when distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
