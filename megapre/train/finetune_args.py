"""The typed configuration of a fine-tuning run: the pretraining config (model, tokenizer, layout,
optimizer, checkpoints, logging: megapre/train/args.py) plus a `task` section. The model and the
tokenizer come from the pretrained checkpoint's saved config; the task section and the flags set
the rest. Flags follow Megatron-LM's former `tasks/` programs where they had one
(`--pretrained-checkpoint`, `--train-data`, `--valid-data`, `--epochs`).

Defaults differ from pretraining where fine-tuning practice differs (BERT paper, appendix A.3):
lr 5e-5 with linear decay, 10% warmup, 3 epochs, micro-batch 32.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from megapre.errors import ConfigError
from megapre.flag_fields import flag_field as _f

from .args import SECTIONS, PretrainConfig, RunPlan, apply_settings, validate


@dataclass
class TaskArgs:
    pretrained_checkpoint: str | None = _f(
        None, "megapre pretraining checkpoint directory (model config and tokenizer come from it; "
        "any layout)")
    random_init: bool = _f(False, "keep the pretrained checkpoint's architecture but not its "
                           "weights: the from-scratch baseline that shows what pretraining bought")
    train_data: list[str] | None = _f(None, "labelled training file(s): .tsv, .csv or .jsonl")
    valid_data: list[str] | None = _f(None, "validation file(s), evaluated after every epoch")
    test_data: list[str] | None = _f(None, "test file(s), evaluated at the end")
    text_key: str = _f("sentence", "column (header name, or 0-based index for files without a "
                       "header) or JSON key of the text")
    text_pair_key: str | None = _f(None, "column or key of the second text (sentence pairs)")
    label_key: str = _f("label", "column or key of the label")
    label_names: list[str] | None = _f(None, "labels in class order (default: the training "
                                       "labels, sorted)")
    num_classes: int | None = _f(None, "classes (default: the number of labels); 1 = regression "
                                 "(MSE)")
    pooling: str | None = _f(None, "sequence vector for the head: cls (BERT default: tanh "
                             "pooler over [CLS]), last (GPT default: last real token) or mean",
                             choices=(None, "cls", "last", "mean"))
    classifier_dropout: float = _f(0.1, "dropout before the classifier")
    epochs: int = _f(3, "passes over the training data (--train-iters overrides)")
    bucket_by_length: bool = _f(False, "batch samples of similar length together (less padding)")
    freeze_backbone: bool = _f(False, "linear probe: train only the head")
    lora_rank: int | None = _f(None, "LoRA: adapter rank (enables LoRA; the base weights freeze)")
    lora_alpha: float = _f(16.0, "LoRA: scaling numerator (scale = alpha / rank)")
    lora_dropout: float = _f(0.0, "LoRA: dropout on the adapters' input")
    lora_targets: list[str] = _f(["qkv", "proj", "fc1", "fc2"], "LoRA: layers to adapt "
                                 "(qkv, proj, fc1 (also the SwiGLU gate), fc2; comma or space "
                                 "separated)")
    predictions_path: str | None = _f(None, "write one test prediction per input line (TSV: "
                                      "source, prediction, probability)")


TASK_SECTIONS = {**SECTIONS, "task": TaskArgs}

# What a fine-tuning command line may set besides the task section (the model's shape and the
# tokenizer belong to the pretrained checkpoint).
FLAGS = {
    "model": ("seq_length", "hidden_dropout", "attention_dropout", "attention_backend"),
    "train": ("micro_batch_size", "global_batch_size", "train_iters", "seed", "clip_grad", "bf16",
              "fp16", "recompute_granularity", "device", "exit_duration_in_mins",
              "exit_interval"),
    "optim": ("lr", "min_lr", "lr_decay_style", "lr_warmup_fraction", "lr_warmup_iters",
              "weight_decay", "adam_beta1", "adam_beta2", "adam_eps"),
    "parallel": ("tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel",
                 "pipeline_schedule", "distributed_timeout_minutes"),
    "checkpoint": ("save", "load", "save_interval", "keep_last"),
    "log": ("log_interval", "metrics_path", "tensorboard_dir", "wandb_project", "wandb_exp_name"),
    "data": ("num_workers",),
    "distill": ("teacher_checkpoint", "kd_alpha", "kd_temperature", "kd_hidden_weight",
                "teacher_bf16"),
}
# The pretrained run's settings that describe the model and its tokenizer (kept from its config).
BASE_SECTIONS = ("model",)
BASE_DATA = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size",
             "allow_tokenizer_mismatch")


@dataclass
class FinetuneConfig(PretrainConfig):
    task: TaskArgs = field(default_factory=TaskArgs)

    @property
    def lora(self):
        """The LoRAConfig of --lora-rank/--lora-alpha/..., or None without LoRA."""
        t = self.task
        if t.lora_rank is None:
            return None
        from megapre.model.lora import LoRAConfig

        targets = tuple(x for item in t.lora_targets for x in item.split(",") if x)
        cfg = LoRAConfig(rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout,
                         targets=targets)
        cfg.validate()
        return cfg


def finetune_defaults(base: PretrainConfig) -> FinetuneConfig:
    """A FinetuneConfig holding `base`'s model and tokenizer and fine-tuning defaults elsewhere."""
    cfg = FinetuneConfig()
    cfg.model = copy.deepcopy(base.model)
    # the position table is the checkpoint's, whatever --seq-length fine-tuning uses
    cfg.model.max_position_embeddings = base.model.max_position_embeddings or base.model.seq_length
    for name in BASE_DATA:
        setattr(cfg.data, name, getattr(base.data, name))
    cfg.train.micro_batch_size = 32
    cfg.train.train_iters = None  # from --epochs
    cfg.train.eval_iters = 0  # evaluation is per epoch, over whole files
    cfg.optim.lr, cfg.optim.min_lr = 5e-5, 0.0
    cfg.optim.lr_decay_style, cfg.optim.lr_warmup_fraction = "linear", 0.1
    cfg.log.log_interval = 10
    return cfg


def finetune_from_dict(data: dict) -> FinetuneConfig:
    """Inverse of to_dict (the config saved with a fine-tuned checkpoint)."""
    cfg = FinetuneConfig()
    task = data.get("task")
    if not isinstance(task, dict):
        raise ConfigError("the saved config has no 'task' section: this is not a fine-tuned "
                          "checkpoint (pass a pretraining checkpoint as --pretrained-checkpoint)")
    rest = {k: v for k, v in data.items() if k not in ("task", "quantization")}
    apply_settings(cfg, rest, Path("<saved config>"))
    cfg.quantization = data.get("quantization")  # an int8 checkpoint (megapre.compress)
    fields = {f.name for f in dataclasses.fields(TaskArgs)}
    for key, value in task.items():
        if key in fields:
            setattr(cfg.task, key, value)
    return cfg


def validate_finetune(cfg: FinetuneConfig, world_size: int, vocab_size: int | None = None,
                      ) -> RunPlan:
    """The pretraining validator's layout, batch and optimizer rules, then the task's."""
    t = cfg.task
    if not t.train_data and not cfg.checkpoint.load:
        raise ConfigError("no training data: give --train-data FILE (TSV, CSV or JSONL)")
    if cfg.train.train_iters is not None and cfg.train.train_iters < 1:
        raise ConfigError(f"--train-iters must be >= 1, got {cfg.train.train_iters}")
    if t.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {t.epochs}")
    if cfg.model.model == "gpt" and t.pooling == "cls":
        raise ConfigError("--pooling cls reads the first token, which a causal GPT computes "
                          "without seeing the rest; use last or mean")
    if t.freeze_backbone and t.lora_rank is not None:
        raise ConfigError("--freeze-backbone and --lora-rank exclude each other (LoRA already "
                          "freezes the base weights); give one")
    _ = cfg.lora  # validates the LoRA flags
    probe = copy.deepcopy(cfg)
    probe.train.train_iters = probe.train.train_iters or 1
    probe.data.train_data_path = ["<task files>"]  # the pretraining data rules do not apply
    plan = validate(probe, world_size, vocab_size)
    resolved = copy.deepcopy(cfg)
    resolved.train.global_batch_size = plan.config.train.global_batch_size
    return dataclasses.replace(plan, config=resolved)
