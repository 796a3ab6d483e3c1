"""The fine-tuning run: a pretrained GPT or BERT, a task head, labelled files, epochs.

    run = Finetuner(cfg)   # data (read, labels, ids), model in this layout, weights, optimizer
    summary = run.train()  # steps; validation report after every epoch; test report at the end

The training step, pipeline schedules, DDP, checkpoints, lr schedules and metrics are the
pretraining ones (megapre/train/step.py, checkpoint.py, optim.py, metrics.py); what is new lives
beside them: the task chunks and loss (task_stages.py), the batches (megapre/data/task_batches.py),
the weights' origin (task_weights.py), the evaluation (task_eval.py) and its report
(task_report.py). Resuming with --load continues exactly: same batches, optimizer, lr and RNG.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megapre.data.task_batches import BatchPlan, TaskBatches
from megapre.data.tasks import EncodedTask, LabelSet, TaskColumns, encode_examples, read_task_files
from megapre.data.tokenizers import build_tokenizer
from megapre.errors import ConfigError
from megapre.model.heads import HeadConfig

from . import distill, task_eval, task_weights
from .args import recompute_spec
from .distill_args import DistillArgs
from .finetune_args import FinetuneConfig, validate_finetune
from .metrics import MetricsLogger, format_duration
from .optim import ShardingArgs, build_optimizer, schedule_from_args, schedule_state, set_lr
from .runtime import build_runtime
from .step import StepConfig, TrainStep
from .stop_flag import StopFlag, agreed_stop
from .task_report import format_report, metrics_record, write_predictions, write_report
from .task_stages import Adaptation

REPORT_FILE = "report.json"


@dataclass
class TaskData:
    labels: LabelSet
    train: EncodedTask | None
    valid: EncodedTask | None
    test: EncodedTask | None
    skipped_empty: dict[str, int]


def head_config(cfg: FinetuneConfig, labels: LabelSet) -> HeadConfig:
    t = cfg.task
    bert = cfg.model.model == "bert"
    return HeadConfig(num_classes=labels.num_classes,
                      pooling=t.pooling or ("cls" if bert else "last"),
                      dropout=t.classifier_dropout, pooler=bert)


def read_data(cfg: FinetuneConfig, tokenizer, saved_labels: dict | None) -> TaskData:
    """Read, label and tokenize the task files (the label order of a resumed run is the
    checkpoint's; a file with another label set is refused)."""
    t = cfg.task
    cols = TaskColumns(t.text_key, t.text_pair_key, t.label_key)
    read = {name: read_task_files(paths, cols) if paths else None
            for name, paths in (("train", t.train_data), ("valid", t.valid_data),
                                ("test", t.test_data))}
    if saved_labels is not None:
        labels = LabelSet.from_dict(saved_labels)
        if t.label_names and tuple(t.label_names) != labels.names:
            raise ConfigError(f"--label-names {' '.join(t.label_names)} differs from the "
                              f"fine-tuned checkpoint's labels {list(labels.names)}")
    elif read["train"] is None:
        raise ConfigError("no training data: give --train-data FILE (TSV, CSV or JSONL)")
    else:
        labels = LabelSet.build(read["train"].examples, t.label_names, t.num_classes)
    if t.num_classes is not None and t.num_classes != labels.num_classes:
        raise ConfigError(f"--num-classes {t.num_classes}, but the model has "
                          f"{labels.num_classes} outputs (labels {list(labels.names)})")
    kind, seq = cfg.model.model, cfg.model.seq_length
    encoded = {name: encode_examples(r.examples, labels, tokenizer, kind, seq) if r else None
               for name, r in read.items()}
    skipped = {name: r.skipped_empty for name, r in read.items() if r is not None}
    return TaskData(labels, encoded["train"], encoded["valid"], encoded["test"], skipped)


def build_task_runtime(cfg: FinetuneConfig, labels: LabelSet, tokenizer=None):
    """Mesh and task model (head for `labels`, adaptation from cfg) in cfg's layout."""
    head = head_config(cfg, labels)
    lora = cfg.lora
    adaptation = Adaptation(freeze_backbone=cfg.task.freeze_backbone, lora=lora)
    rt = build_runtime(cfg, tokenizer=tokenizer,
                       recompute_granularity=recompute_spec(cfg.train),
                       adapter=distill.task_adapter(cfg, labels, head, adaptation))
    return rt, head, lora


def load_task_weights(rt, cfg: FinetuneConfig, resume: Path | None, saved_task: dict,
                      optimizer=None, say=print) -> tuple[int, list[float] | None]:
    """Weights of a task model: pretrained backbone (fresh run, or the base of LoRA adapters),
    then the fine-tuned checkpoint `resume` (with `optimizer` and RNG when given). Returns
    (iteration, base fingerprint (LoRA) or None). Collective."""
    from .checkpoint import load_checkpoint

    t, lora = cfg.task, cfg.lora
    base = Path(t.pretrained_checkpoint) if t.pretrained_checkpoint else None
    needs_base = resume is None or lora is not None
    if needs_base and base is not None and not t.random_init:
        info = task_weights.load_pretrained(base, rt.model, _base_has_pooler(base))
        say(f"loaded pretrained weights from {info['path']} (iteration {info['iteration']})")
    elif needs_base and lora is not None and resume is not None:
        raise ConfigError(f"{resume} holds LoRA adapters only; their base model comes from "
                          "--pretrained-checkpoint, which is not set")
    fingerprint = task_weights.base_fingerprint(rt.model) if lora is not None else None
    if resume is None:
        return 0, fingerprint
    if lora is not None:
        task_weights.check_fingerprint(saved_task.get("base_fingerprint"), fingerprint,
                                       str(base), str(resume))
    info = load_checkpoint(resume, rt.model, optimizer, rt.mesh, tracker=rt.tracker,
                           load_rng=optimizer is not None,
                           select=task_weights.adapter_keys if lora is not None else None)
    say(f"loaded fine-tuned checkpoint {info['path']} (iteration {info['iteration']})")
    return int(info["iteration"]), fingerprint


def _base_has_pooler(base: Path) -> bool:
    from megapre.inference.checkpoint_io import saved_config

    from .checkpoint import resolve_checkpoint

    pre = saved_config(resolve_checkpoint(base))
    return pre.model.model == "bert" and pre.model.bert_binary_head


class Finetuner:
    def __init__(self, cfg: FinetuneConfig, *, resume: Path | None = None,
                 saved_task: dict | None = None) -> None:
        """`resume`: the fine-tuned checkpoint to continue (its saved `task` extra in
        `saved_task`); else the weights come from cfg.task.pretrained_checkpoint."""
        self.start_time = time.time()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.plan = validate_finetune(cfg, world)
        self.cfg = cfg = self.plan.config
        self.resume, self.saved_task = resume, saved_task or {}
        self.tokenizer = build_tokenizer(cfg.tokenizer_config())
        self.data = read_data(cfg, self.tokenizer, self.saved_task.get("labels"))
        rt, self.head, self.lora = build_task_runtime(cfg, self.data.labels, self.tokenizer)
        self.mesh, self.model, self.tracker, self.device = rt.mesh, rt.model, rt.tracker, rt.device
        t, o = cfg.train, cfg.optim
        self.batches = TaskBatches(self.data.train, self._batch_plan(), self._pad_id())
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.train_iters = t.train_iters or cfg.task.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, o.lr, o.weight_decay,
                                         (o.adam_beta1, o.adam_beta2), o.adam_eps,
                                         sharding=ShardingArgs.of(cfg.parallel))
        self.schedule = schedule_from_args(o, self.train_iters)
        self.step = TrainStep(self.model, self.optimizer,
                              StepConfig(t.micro_batch_size, t.global_batch_size, t.clip_grad,
                                         self.plan.pipeline_schedule))
        self.reporting = task_eval.is_reporting_rank(self.model)
        self.logger = MetricsLogger(self.reporting, cfg.log.metrics_path, cfg.log.tensorboard_dir,
                                    cfg.log.wandb_project, cfg.log.wandb_exp_name, cfg.to_dict(),
                                    wandb_entity=cfg.log.wandb_entity,
                                    wandb_dir=cfg.log.wandb_save_dir)
        self.stop = StopFlag()
        self.save_lock = self._lock_save_dir()
        # last: nothing after a restored checkpoint may draw random numbers
        try:
            self.iteration, self.base_fingerprint = load_task_weights(
                rt, cfg, resume, self.saved_task, self.optimizer, self._print)
        except BaseException:
            self.close()
            raise
        self.stop.install()

    # -- set-up ------------------------------------------------------------------------------
    def _lock_save_dir(self):
        """One run per --save directory, as for pretraining."""
        if not self.cfg.checkpoint.save:
            return None
        from .checkpoint_lock import lock_save_dir

        lock, notes = lock_save_dir(self.cfg.checkpoint.save, self.device)
        for note in notes:
            self._print(f"WARNING: {note}")
        return lock

    def _pad_id(self) -> int:
        return pad_id(self.tokenizer)

    def _batch_plan(self) -> BatchPlan:
        return batch_plan(self.cfg, self.mesh)

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        moved = self.logger.start(resumed=self.iteration > 0)
        if moved:
            self._print(moved)
        self._banner()
        data = self.batches.train(self.iteration)
        summary: dict[str, Any] = {"start_iteration": self.iteration, "reports": {}}
        exit_reason, window = "finished", _Window()
        while self.iteration < self.train_iters:
            lr = self.schedule(self.iteration)
            set_lr(self.optimizer, lr)
            t0 = time.perf_counter()
            with self._autocast():
                result = self.step(data)
            self.iteration += 1
            window.add(result.loss, result.grad_norm, time.perf_counter() - t0,
                       self.step.normalizers.tokens)  # real tokens of the global batch
            if self.iteration % cfg.log.log_interval == 0 or self.iteration == self.train_iters:
                self._log_train(window.take(), lr)
            if self.iteration % self.steps_per_epoch == 0 and self.data.valid is not None:
                summary["reports"]["valid"] = self.evaluate("valid")
            if cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0:
                self.save()
            reason = self._should_exit()
            if reason:
                exit_reason = reason
                break
        if exit_reason == "finished":
            if self.data.valid is not None and self.iteration % self.steps_per_epoch:
                summary["reports"]["valid"] = self.evaluate("valid")
            if self.data.test is not None:
                summary["reports"]["test"] = self.evaluate("test", cfg.task.predictions_path)
        if cfg.checkpoint.save and (exit_reason != "finished" or not cfg.checkpoint.save_interval
                                    or self.iteration % cfg.checkpoint.save_interval):
            self.save()
        self._write_report(summary["reports"])
        summary.update(iteration=self.iteration, exit_reason=exit_reason,
                       train_iters=self.train_iters, epochs=self.iteration / self.steps_per_epoch,
                       padding_fraction=self.batches.padding_fraction("train"),
                       truncated=self.data.train.truncated,
                       elapsed_s=time.time() - self.start_time)
        self.logger.close()
        return summary

    def evaluate(self, split: str, predictions_path: str | None = None) -> dict | None:
        """Report of one split (reporting rank; None elsewhere), logged and printed."""
        data: EncodedTask = getattr(self.data, split)
        plan = self._batch_plan()
        pred = task_eval.predict(self.model, self.step, data, plan, self._pad_id(),
                                 self._autocast)
        if pred is None:
            return None
        report = task_eval.report(pred, self.data.labels)
        report["truncated"] = data.truncated
        epoch = self.iteration / self.steps_per_epoch
        title = f"{split} at iteration {self.iteration} (epoch {epoch:.2f})"
        self.logger.log(metrics_record(report, split, epoch, self.iteration),
                        console=format_report(report, title))
        if predictions_path:
            _write_predictions(predictions_path, data, pred, self.data.labels)
        return report

    # -- checkpoints ---------------------------------------------------------------------------
    def task_state(self) -> dict:
        return {"labels": self.data.labels.to_dict(), "head": dataclasses.asdict(self.head),
                "lora": self.lora.to_dict() if self.lora else None,
                "base_fingerprint": self.base_fingerprint,
                "pretrained_checkpoint": self.cfg.task.pretrained_checkpoint}

    def save(self) -> None:
        from .checkpoint import save_checkpoint

        c = self.cfg.checkpoint
        save_checkpoint(c.save, self.iteration, self.model, self.optimizer, self.mesh,
                        consumed_samples=self.iteration * self.cfg.train.global_batch_size,
                        config=self.cfg.to_dict(), tracker=self.tracker,
                        extra={"task": self.task_state(),
                               "lr_schedule": schedule_state(self.schedule)},
                        keep_last=c.keep_last, tokenizer=self.tokenizer.describe(),
                        select=task_weights.adapter_keys if self.lora else None)
        self._print(f"saved checkpoint at iteration {self.iteration} to {c.save}")

    def _write_report(self, reports: dict) -> None:
        if not self.reporting or not reports:
            return
        out = self.cfg.checkpoint.save or (os.path.dirname(os.path.abspath(
            self.cfg.log.metrics_path)) if self.cfg.log.metrics_path else None)
        if out is not None:
            write_report(Path(out) / REPORT_FILE, {k: v for k, v in reports.items() if v})

    # -- helpers -------------------------------------------------------------------------------
    def _banner(self) -> None:
        total = trainable = 0
        for m in self.model.models:
            for name, p in m.named_parameters():
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        d = self.data
        self._print(f"task: {len(d.train)} training examples, labels {list(d.labels.names) or 'regression'}, "
                    f"{self.steps_per_epoch} steps per epoch, {self.train_iters} steps; "
                    f"{d.train.truncated} texts truncated to --seq-length "
                    f"{self.cfg.model.seq_length}; empty texts skipped: {d.skipped_empty}")
        mode = ("LoRA" if self.lora else "linear probe" if self.cfg.task.freeze_backbone
                else "full fine-tuning")
        self._print(f"{mode}: {trainable:,} of {total:,} parameters on this rank train "
                    f"({100 * trainable / max(total, 1):.2f}%)")

    def _autocast(self):
        t = self.cfg.train
        if t.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if t.fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _log_train(self, w: dict, lr: float) -> None:
        if not w:
            return
        tokens_s = w["tokens"] / max(w["seconds"], 1e-9)
        record = {"iteration": self.iteration, "train_iters": self.train_iters,
                  "epoch": self.iteration / self.steps_per_epoch, "loss": w["loss"],
                  "task_loss": w["loss"], "lr": lr, "grad_norm": w["grad_norm"],
                  "tokens_per_s": tokens_s, "step_time_s": w["seconds"] / w["steps"],
                  "padding_fraction": self.batches.padding_fraction("train"),
                  "elapsed_s": time.time() - self.start_time}
        line = (f"iteration {self.iteration}/{self.train_iters} | epoch {record['epoch']:.2f} | "
                f"elapsed {format_duration(record['elapsed_s'])} | "
                f"{1000 * record['step_time_s']:.1f} ms/iter | tokens/s {tokens_s:.0f} (real) | "
                f"task loss {w['loss']:.6e} | lr {lr:.4e} | grad norm {w['grad_norm']:.4f} | "
                f"padding {100 * record['padding_fraction']:.1f}%")
        self.logger.log(record, console=line)

    def _should_exit(self) -> str | None:
        t = self.cfg.train
        reason = agreed_stop(
            self.stop.signum,
            t.exit_duration_in_mins is not None and
            time.time() - self.start_time > 60 * t.exit_duration_in_mins,
            t.exit_interval is not None and self.iteration % t.exit_interval == 0
            and self.iteration < self.train_iters,
            self.device)
        if reason:
            self._print(f"stopping at iteration {self.iteration}: {reason}")
        return reason

    def _print(self, text: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[megapre] {text}", flush=True)

    def close(self) -> None:
        if getattr(self, "save_lock", None) is not None:
            self.save_lock.release()
            self.save_lock = None
        self.stop.restore()
        self.mesh.destroy()


def pad_id(tokenizer) -> int:
    """The id padding positions hold (never read: masked or after the pooled token)."""
    for pad in (tokenizer.pad, tokenizer.eod, 0):
        if pad is not None:
            return pad
    return 0


def batch_plan(cfg: FinetuneConfig, mesh) -> BatchPlan:
    t, p = cfg.train, cfg.parallel
    return BatchPlan(t.micro_batch_size, t.global_batch_size, mesh.dp_rank, mesh.dp_size, t.seed,
                     bucket_by_length=cfg.task.bucket_by_length,
                     pad_to=cfg.model.seq_length if mesh.pp_size > 1 else None,
                     pad_multiple=mesh.tp_size if p.sequence_parallel else 1)


class _Window:
    def __init__(self) -> None:
        self.take()

    def add(self, loss: float, grad_norm: float, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.loss += loss
        self.seconds += seconds
        self.tokens += tokens
        self.grad_norm = grad_norm

    def take(self) -> dict:
        out = ({"steps": self.steps, "loss": self.loss / self.steps, "seconds": self.seconds,
                "tokens": self.tokens, "grad_norm": self.grad_norm}
               if getattr(self, "steps", 0) else {})
        self.steps, self.loss, self.seconds, self.tokens, self.grad_norm = 0, 0.0, 0.0, 0, 0.0
        return out




@dataclass
class Finetuned:
    """A fine-tuned checkpoint opened for inference in this job's layout."""

    cfg: FinetuneConfig
    runtime: Any
    labels: LabelSet
    task_state: dict
    step: TrainStep
    iteration: int

    def close(self) -> None:
        self.runtime.close()


def open_finetuned(path: Path, adjust=None) -> Finetuned:
    """Build the task model of fine-tuned checkpoint `path` (LoRA adapters on their base) with
    its saved config, after `adjust(cfg)` sets this job's layout, batch sizes and device (a
    global batch left None becomes micro-batch x DP x PP: one micro-batch per pipeline stage)."""
    from .checkpoint import read_config, read_meta
    from .finetune_args import finetune_from_dict

    cfg = finetune_from_dict(read_config(path) or {})
    cfg.distill = DistillArgs()  # a teacher served the checkpoint's training only
    task_state = (read_meta(path).get("extra") or {}).get("task")
    if not task_state:
        raise ConfigError(f"{path} is not a fine-tuned checkpoint (no task head recorded); "
                          "evaluate a pretraining checkpoint with --data-path or --text-file")
    if adjust is not None:
        adjust(cfg)
    cfg.checkpoint.load = str(path)
    cfg.checkpoint.save = None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = cfg.parallel
    if cfg.train.global_batch_size is None:  # enough micro-batches to fill the pipeline
        stages = p.pipeline_model_parallel_size
        dp = max(world // (p.tensor_model_parallel_size * stages), 1)
        cfg.train.global_batch_size = cfg.train.micro_batch_size * dp * stages
    cfg = validate_finetune(cfg, world).config
    labels = LabelSet.from_dict(task_state["labels"])
    rt, _, _ = build_task_runtime(cfg, labels)
    try:
        iteration, _ = load_task_weights(rt, cfg, path, task_state, None, lambda _: None)
        t = cfg.train
        step = TrainStep(rt.model, None, StepConfig(t.micro_batch_size, t.global_batch_size,
                                                    t.clip_grad, _schedule(cfg, rt.mesh)))
    except BaseException:
        rt.close()
        raise
    return Finetuned(cfg, rt, labels, task_state, step, iteration)


def _schedule(cfg: FinetuneConfig, mesh) -> str | None:
    from megapre.parallel.layout import resolve_schedule

    return resolve_schedule(cfg.parallel.pipeline_schedule if mesh.pp_size > 1 else None,
                            mesh.pp_size, None)


def evaluate_files(ft: Finetuned, files: list[str], columns: TaskColumns,
                   predictions_path: str | None = None) -> dict | None:
    """The report of `ft` on labelled `files` (reporting rank; None elsewhere). Labels must be
    among the checkpoint's."""
    rt, cfg = ft.runtime, ft.cfg
    read = read_task_files(files, columns)
    data = encode_examples(read.examples, ft.labels, rt.tokenizer, cfg.model.model,
                           cfg.model.seq_length)
    autocast = (lambda: torch.autocast(rt.device.type, dtype=torch.bfloat16)) if cfg.train.bf16 \
        else contextlib.nullcontext
    pred = task_eval.predict(rt.model, ft.step, data, batch_plan(cfg, rt.mesh),
                             pad_id(rt.tokenizer), autocast)
    if pred is None:
        return None
    report = task_eval.report(pred, ft.labels)
    report.update(truncated=data.truncated, skipped_empty=read.skipped_empty)
    if predictions_path:
        _write_predictions(predictions_path, data, pred, ft.labels)
    return report


def _write_predictions(path: str, data: EncodedTask, pred: task_eval.Predictions,
                       labels: LabelSet) -> None:
    names = None if labels.regression else list(labels.names)
    guess = pred.predicted(labels.regression)
    shown = guess.tolist() if names is None else [names[i] for i in guess]
    write_predictions(path, data.sources, shown, None if names is None else pred.probabilities(),
                      names)
