"""The knowledge-distillation flags of pretraining and fine-tuning (megapre/train/distill.py):

    loss = alpha x CE(labels) + (1 - alpha) x T^2 x KL(softmax(teacher/T) || softmax(student/T))
           + hidden_weight x MSE(final hidden states)

The teacher is a megapre checkpoint (pretraining: any GPT of the same vocabulary; fine-tuning: a
fine-tuned classifier of the same task). Without --teacher-checkpoint the other flags must keep
their defaults, so a typo cannot leave a run silently undistilled.
"""
from __future__ import annotations

from dataclasses import dataclass

from megapre.errors import ConfigError
from megapre.flag_fields import flag_field as _f

TEACHER_FLAG = "--teacher-checkpoint"


@dataclass
class DistillArgs:
    teacher_checkpoint: str | None = _f(
        None, "knowledge distillation: megapre checkpoint directory of the frozen teacher (its "
        "architecture comes from its saved config; same vocabulary as the student; fine-tuning: "
        "a fine-tuned classifier of the same task)")
    kd_alpha: float = _f(0.5, "distillation: weight of the label cross entropy; the KL term "
                         "gets 1 - alpha")
    kd_temperature: float = _f(1.0, "distillation: softmax temperature T of teacher and student "
                               "(the KL term is scaled by T^2)")
    kd_hidden_weight: float = _f(0.0, "distillation: weight of the MSE between the final hidden "
                                 "states of student and teacher (same hidden size needed)")
    teacher_bf16: bool = _f(False, "distillation: run the teacher's forward under bf16 autocast")

    @property
    def enabled(self) -> bool:
        return self.teacher_checkpoint is not None

    def validate(self) -> None:
        """Ranges of the flags (the teacher itself is checked when it is loaded)."""
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ConfigError(f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise ConfigError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        if not self.kd_hidden_weight >= 0:
            raise ConfigError(f"--kd-hidden-weight must be >= 0, got {self.kd_hidden_weight}")
        if self.enabled:
            return
        changed = [flag for flag, on in (
            ("--kd-alpha", self.kd_alpha != 0.5), ("--kd-temperature", self.kd_temperature != 1.0),
            ("--kd-hidden-weight", self.kd_hidden_weight != 0.0),
            ("--teacher-bf16", self.teacher_bf16)) if on]
        if changed:
            raise ConfigError(f"{', '.join(changed)} needs {TEACHER_FLAG} DIR (the teacher to "
                              "distil from)")


def check_distill_layout(d: DistillArgs, cp: int) -> None:
    """The flag ranges, then what distillation does not run: the teacher reads whole sequences
    on the last pipeline stage, so not context-parallel shares."""
    d.validate()
    if not d.enabled:
        return
    if cp > 1:
        raise ConfigError(f"{TEACHER_FLAG} with --context-parallel-size {cp}: distillation runs "
                          "with context parallelism 1")
