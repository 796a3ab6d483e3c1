"""Knowledge distillation (--teacher-checkpoint): a frozen teacher runs beside the student's
last model chunk and the loss mixes the labels with the teacher's distribution
(megapre/train/losses.py `distill_lm_loss`, `distill_task_loss`).

    pretraining  student GPT chunk -> sharded logits [s, b, vocab/tp] -> CE(labels) per token
                 teacher GPT       -> sharded logits, same padded vocabulary and TP slices
                 -> vocab-parallel KL per token (megapre/parallel/kl_divergence.py, no gather)
                 -> optional MSE of the final-norm hidden states (same width)
    fine-tuning  student classifier logits [b, C]; teacher: a fine-tuned classifier of the same
                 labels; KL over the classes per sample

The teacher is built in the student's mesh, TP-sharded like it and replicated over DP. Under
pipeline parallelism it is one chunk of all its layers on the last stage, reading the token ids
that every chunk receives (`teacher_ids`), so the schedule is unchanged; the other stages take
part in its (collective) load and drop it. Context parallelism is refused
(`check_distill_layout`). It loads its own checkpoint (architecture from its saved config), is
put in eval mode with `requires_grad_(False)` and runs under `torch.no_grad()`. It is held
outside the module tree (`_teacher` is a tuple), so it is in no state dict, no DDP bucket, no
optimizer and no student checkpoint; a resumed run loads it again from the flag.
"""
from __future__ import annotations

import contextlib
import copy
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megapre.data.tokenizers import build_tokenizer
from megapre.errors import ConfigError
from megapre.model.config import TransformerConfig
from megapre.model.heads import HeadConfig
from megapre.model.lm_head import token_loss
from megapre.parallel.comm import gather_from_sp
from megapre.parallel.kl_divergence import vocab_parallel_kl_divergence
from megapre.parallel.mesh import ParallelMesh
from megapre.parallel.pipeline import ChunkSpec
from megapre.parallel.random import RNGTracker

from .args import PretrainConfig
from .distill_args import TEACHER_FLAG, DistillArgs
from .losses import KDWeights, Normalizers, distill_lm_loss, distill_task_loss
from .parallel_model import ParallelModel
from .stages import PIPE_DTYPE, MicroBatch, ModelAdapter
from .task_stages import Adaptation, TaskAdapter, TaskChunk


# -- the teacher ---------------------------------------------------------------------------------

def _teacher_path(flag_value: str) -> Path:
    from .checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(flag_value)
    except (FileNotFoundError, ConfigError) as e:
        raise ConfigError(f"{TEACHER_FLAG} {flag_value}: {str(e).splitlines()[0]}") from None


def _teacher_model_config(tcfg: PretrainConfig, student: PretrainConfig, vocab_size: int
                          ) -> TransformerConfig:
    """The teacher's TransformerConfig in the student's layout: the student's vocabulary padding
    (so both have the same logit slices per TP rank) and sequence length, no dropout."""
    tm = copy.deepcopy(tcfg.model)
    tm.make_vocab_size_divisible_by = student.model.make_vocab_size_divisible_by
    tm.max_position_embeddings = tm.max_position_embeddings or tm.seq_length
    tm.seq_length = student.model.seq_length
    tm.hidden_dropout = tm.attention_dropout = 0.0
    tcfg = copy.deepcopy(tcfg)
    tcfg.model = tm
    return tcfg.transformer_config(vocab_size)


def _check_teacher(tcfg: PretrainConfig, student: PretrainConfig, student_vocab: int,
                   flag_value: str) -> int:
    """Same model family and vocabulary as the student, hidden widths equal when the hidden
    MSE is asked for; returns the teacher's vocabulary size."""
    if tcfg.model.model != student.model.model:
        raise ConfigError(f"{TEACHER_FLAG} {flag_value}: the teacher is a {tcfg.model.model}, the "
                          f"student a {student.model.model}; distil within one model family")
    vocab = build_tokenizer(tcfg.tokenizer_config()).vocab_size
    if vocab != student_vocab:
        raise ConfigError(f"{TEACHER_FLAG} {flag_value}: the teacher's vocabulary has {vocab} "
                          f"tokens, the student's {student_vocab}; teacher and student need the "
                          "same tokenizer")
    width, own = tcfg.model.hidden_size, student.model.hidden_size
    if student.distill.kd_hidden_weight > 0 and width != own:
        raise ConfigError(f"--kd-hidden-weight {student.distill.kd_hidden_weight}: the teacher's "
                          f"hidden size is {width}, the student's {own}; the hidden-state MSE "
                          "needs equal widths (use --kd-hidden-weight 0)")
    return vocab


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Building a model and loading a checkpoint without its RNG (which reseeds) may move the
    global generators; the teacher must leave the student's streams (dropout, data order) as
    they were."""
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _whole(adapter: ModelAdapter, seed: int, flag_value: str) -> ParallelModel:
    """The teacher as one chunk of all its layers on this rank (whatever the pipeline split of
    the student): it runs on the last stage, from the token ids. Every rank builds and loads it
    (the load is collective); the others drop it then."""
    spec = ChunkSpec.whole(adapter.cfg.num_layers)
    try:  # the model classes check the mesh's layout rules against the teacher's shape
        return ParallelModel(adapter, [spec], [adapter.build(spec, seed=seed)])
    except ConfigError as e:
        raise ConfigError(f"{TEACHER_FLAG} {flag_value}: the teacher cannot run in this "
                          f"layout: {e}") from None


def _int8_layers(tcfg: PretrainConfig, teacher: ParallelModel, mesh: ParallelMesh) -> None:
    """An int8 teacher (a megapre.compress checkpoint) gets its int8 layers before the load."""
    if tcfg.quantization is not None:
        from megapre.compress.structure import build_recorded

        build_recorded(tcfg.quantization, teacher.models, mesh)


def _freeze(model: ParallelModel, mesh: ParallelMesh) -> nn.Module | None:
    """The teacher's one chunk, in eval mode and without gradients; None on a rank without the
    last pipeline stage (it only took part in the collective load)."""
    (chunk,) = model.chunks
    if not mesh.is_last_stage:
        return None
    chunk.eval()
    chunk.requires_grad_(False)
    return chunk


def load_lm_teacher(cfg: PretrainConfig, student_vocab: int, mesh: ParallelMesh) -> nn.Module:
    """The frozen teacher GPT chunk of pretraining (returns per-token sharded logits)."""
    from megapre.inference.checkpoint_io import saved_config

    from .checkpoint import load_checkpoint

    if cfg.model.model != "gpt":
        raise ConfigError(f"{TEACHER_FLAG}: distillation in pretraining is for --model gpt (got "
                          f"{cfg.model.model}); distil BERT classifiers with megapre.finetune")
    flag_value = cfg.distill.teacher_checkpoint
    path = _teacher_path(flag_value)
    tcfg = saved_config(path)
    vocab = _check_teacher(tcfg, cfg, student_vocab, flag_value)
    mc = _teacher_model_config(tcfg, cfg, vocab)
    with _rng_untouched():
        teacher = _whole(ModelAdapter("gpt", mc, mesh), tcfg.train.seed, flag_value)
        _int8_layers(tcfg, teacher, mesh)
        load_checkpoint(path, teacher, None, mesh, load_rng=False)
    return _freeze(teacher, mesh)


def load_task_teacher(cfg, labels, student_vocab: int, mesh: ParallelMesh) -> nn.Module:
    """The frozen teacher classifier of fine-tuning (a fine-tuned checkpoint of the same labels;
    LoRA adapters on their base are fine)."""
    from megapre.data.tasks import LabelSet

    from .checkpoint import read_config, read_meta
    from .finetune import load_task_weights
    from .finetune_args import finetune_from_dict

    flag_value = cfg.distill.teacher_checkpoint
    path = _teacher_path(flag_value)
    task = (read_meta(path).get("extra") or {}).get("task")
    if not task:
        raise ConfigError(f"{TEACHER_FLAG} {flag_value}: the teacher has no classification head "
                          "(not a fine-tuned checkpoint); fine-tune the teacher on this task first")
    own = LabelSet.from_dict(task["labels"])
    if own.num_classes == 1 or labels.num_classes == 1:
        raise ConfigError(f"{TEACHER_FLAG}: a regression task (one output) has no class "
                          "distribution to distil")
    if own.num_classes != labels.num_classes or tuple(own.names) != tuple(labels.names):
        raise ConfigError(f"{TEACHER_FLAG} {flag_value}: the teacher's head has "
                          f"{own.num_classes} classes {list(own.names)}, the student's "
                          f"{labels.num_classes} {list(labels.names)}; the teacher must be "
                          "fine-tuned on the same task")
    tcfg = finetune_from_dict(read_config(path) or {})
    tcfg.distill = DistillArgs()
    vocab = _check_teacher(tcfg, cfg, student_vocab, flag_value)
    mc = _teacher_model_config(tcfg, cfg, vocab)
    adapter = TaskAdapter(tcfg.model.model, mc, mesh, HeadConfig(**task["head"]),
                          Adaptation(lora=tcfg.lora))
    with _rng_untouched():
        teacher = _whole(adapter, tcfg.train.seed, flag_value)
        _int8_layers(tcfg, teacher, mesh)
        load_task_weights(SimpleNamespace(model=teacher, mesh=mesh, tracker=None), tcfg, path,
                          task, None, lambda _: None)
    return _freeze(teacher, mesh)


def _no_grad_forward(bf16: bool, device: torch.device) -> contextlib.ExitStack:
    """The teacher's forward: no autograd graph; bf16 autocast under --teacher-bf16."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if bf16:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


class _FinalHidden:
    """Keeps the output of a model's final norm (the hidden states the MSE compares)."""

    def __init__(self, model: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        model.final_norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.value = output

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        return value


# -- pretraining -----------------------------------------------------------------------------

class DistillChunk(nn.Module):
    """A GPT pipeline chunk with its teacher: hidden states out on the way (as GPTChunk), and on
    the last stage per-token (CE, KL[, hidden MSE]) [b, s], the teacher reading the token ids
    (`teacher_ids`, given to every chunk). `model` is the student, as in GPTChunk, so checkpoints
    and ParallelModel see only the student."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, kd: DistillArgs) -> None:
        super().__init__()
        self.model, self.kd = student, kd
        self._teacher = (teacher,)  # not a submodule: never saved, synced or optimized
        self._hidden = None
        if student.stage.is_last and kd.kd_hidden_weight > 0:
            self._hidden = (_FinalHidden(student), _FinalHidden(teacher.model))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                teacher_ids: torch.Tensor | None = None):
        m = self.model
        first = m.stage.is_first
        out = m(input_ids=x if first else None, hidden_states=None if first else x,
                position_ids=position_ids, attention_mask=attention_mask)
        if not m.stage.is_last:
            return out.to(PIPE_DTYPE)
        ce = token_loss(out, labels, m.mesh, m.cfg.vocab_size, m.label_smoothing)
        (teacher,) = self._teacher
        with _no_grad_forward(self.kd.teacher_bf16, out.device):
            t_logits = teacher.model(input_ids=teacher_ids, position_ids=position_ids,
                                     attention_mask=attention_mask)
        kl = vocab_parallel_kl_divergence(out, t_logits.float(), m.mesh.tp_group,
                                          vocab_size=m.cfg.vocab_size,
                                          temperature=self.kd.kd_temperature).t()
        if self._hidden is None:
            return ce, kl
        mine, theirs = (h.take() for h in self._hidden)
        mse = (mine.float() - theirs.float().detach()).pow(2).mean(-1)  # [s(/tp), b]
        if m.mesh.sequence_parallel:
            mse = gather_from_sp(mse, m.mesh.tp_group, 0, grad_is_partial=False)
        return ce, kl, mse.t()


def _weights(kd: DistillArgs) -> KDWeights:
    return KDWeights(kd.kd_alpha, kd.kd_temperature, kd.kd_hidden_weight)


class DistillAdapter(ModelAdapter):
    """The GPT pretraining adapter with a teacher: DistillChunk chunks, `distill_lm_loss`, and
    the parts 'lm loss' (CE), 'kd loss' (T^2 KL) and 'hidden loss' weighted into the loss."""

    def __init__(self, cfg: TransformerConfig, mesh: ParallelMesh, teacher: nn.Module,
                 kd: DistillArgs) -> None:
        super().__init__("gpt", cfg, mesh)
        self.teacher, self.kd, self.weights = teacher, kd, _weights(kd)

    def build(self, spec: ChunkSpec, **kw) -> nn.Module:
        return DistillChunk(super().build(spec, **kw).model, self.teacher, self.kd)

    def split(self, mb: dict[str, torch.Tensor]) -> MicroBatch:
        out = super().split(mb)
        out.kwargs["teacher_ids"] = out.first_args[0]
        return out

    def loss(self, output, target, norm: Normalizers):
        return distill_lm_loss(output, target, norm, self.weights)

    def examples(self, micro_batch: int):
        first, hidden, (lm,) = super().examples(micro_batch)
        return first, hidden, (lm,) * len(self.part_names())

    def part_names(self) -> set[str]:
        return {"lm loss", "kd loss"} | ({"hidden loss"} if self.weights.hidden > 0 else set())

    def total(self, parts: dict[str, float]) -> float:
        return self.weights.total(parts, "lm loss")


def lm_adapter(cfg: PretrainConfig
               ) -> Callable[[TransformerConfig, ParallelMesh], ModelAdapter] | None:
    """build_runtime's `adapter` for a distillation run (None without --teacher-checkpoint)."""
    if not cfg.distill.enabled:
        return None

    def make(model_cfg: TransformerConfig, mesh: ParallelMesh) -> ModelAdapter:
        teacher = load_lm_teacher(cfg, model_cfg.vocab_size, mesh)
        return DistillAdapter(model_cfg, mesh, teacher, cfg.distill)
    return make


# -- fine-tuning -------------------------------------------------------------------------------

class DistillTaskChunk(TaskChunk):
    """A task chunk whose last stage also returns the per-sample KL to its teacher's classes
    (the teacher reads `teacher_ids`, the token ids given to every chunk)."""

    def __init__(self, model: nn.Module, kind: str, teacher: nn.Module | None,
                 kd: DistillArgs) -> None:
        super().__init__(model, kind)
        self.kd = kd
        self._teacher = (teacher,)  # not a submodule: never saved, synced or optimized

    def forward(self, x: torch.Tensor, types: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                teacher_ids: torch.Tensor | None = None):
        logits = super().forward(x, types, padding_mask, lengths)
        if not self.model.stage.is_last:
            return logits  # hidden states on their way
        (teacher,) = self._teacher
        with _no_grad_forward(self.kd.teacher_bf16, logits.device):
            t_logits = teacher(teacher_ids, types, padding_mask, lengths)
        t = self.kd.kd_temperature
        log_q = F.log_softmax(logits.float() / t, dim=-1)
        log_p = F.log_softmax(t_logits.float() / t, dim=-1)
        return logits, (log_p.exp() * (log_p - log_q)).sum(-1)


class DistillTaskAdapter(TaskAdapter):
    """The fine-tuning adapter with a teacher classifier: 'task loss' and 'kd loss' parts."""

    def __init__(self, kind: str, cfg: TransformerConfig, mesh: ParallelMesh, head: HeadConfig,
                 adaptation: Adaptation, teacher: nn.Module, kd: DistillArgs) -> None:
        super().__init__(kind, cfg, mesh, head, adaptation)
        self.teacher, self.kd, self.weights = teacher, kd, _weights(kd)

    def build(self, spec: ChunkSpec, *, seed: int, tracker: RNGTracker | None = None, **kw):
        chunk = super().build(spec, seed=seed, tracker=tracker, **kw)
        return DistillTaskChunk(chunk.model, self.kind, self.teacher, self.kd)

    def split(self, mb: dict[str, torch.Tensor]) -> MicroBatch:
        out = super().split(mb)
        out.kwargs["teacher_ids"] = out.first_args[0]
        return out

    def examples(self, micro_batch: int):
        first, hidden, (logits,) = super().examples(micro_batch)
        kl = torch.empty(micro_batch, dtype=torch.float32, device=torch.device("meta"),
                         requires_grad=True)
        return first, hidden, (logits, kl)

    def loss(self, output, target, norm: Normalizers):
        logits, kl = output
        return distill_task_loss(super().loss(logits, target, norm), kl, target, norm,
                                 self.weights)

    def part_names(self) -> set[str]:
        return {"task loss", "kd loss"}

    def total(self, parts: dict[str, float]) -> float:
        return self.weights.total(parts, "task loss")


def task_adapter(cfg, labels, head: HeadConfig, adaptation: Adaptation
                 ) -> Callable[[TransformerConfig, ParallelMesh], TaskAdapter]:
    """build_runtime's `adapter` for fine-tuning, with the teacher when distilling."""
    def make(model_cfg: TransformerConfig, mesh: ParallelMesh) -> TaskAdapter:
        if not cfg.distill.enabled:
            return TaskAdapter(cfg.model.model, model_cfg, mesh, head, adaptation)
        if cfg.distill.kd_hidden_weight > 0:
            raise ConfigError("--kd-hidden-weight is for pretraining; fine-tuning distils the "
                              "teacher's class distribution (use --kd-hidden-weight 0)")
        teacher = load_task_teacher(cfg, labels, model_cfg.vocab_size, mesh)
        return DistillTaskAdapter(cfg.model.model, model_cfg, mesh, head, adaptation, teacher,
                                  cfg.distill)
    return make
