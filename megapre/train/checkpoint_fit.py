"""Does a checkpoint fit the model it is loaded into? The saved model config is compared first
(a checkpoint of another architecture can have tensors of the very same shapes, e.g. another
head count), then the tensors both ways: every model tensor must be in the checkpoint with its
shape, and every model tensor of the checkpoint must be used by the model (else weights are
silently dropped and a later `--keep-last` prunes the only copy).

`--dist-ckpt-strictness` (Megatron's flag; a subset of its values) chooses what a difference is:

    raise_all       (default) any architecture difference, missing or unused tensor: refuse
    log_unexpected  architecture differences and unused checkpoint tensors are warnings
                    (a deliberate partial load); missing tensors are still refused
    log_all         also missing tensors are warnings: they keep their fresh initialization

A tensor whose shape differs can never load and is refused whatever the strictness.

Settings that leave every tensor and the function of the weights as they were may change on a
resume or a finetune and are not compared (BENIGN): dropouts, attention backend, the GELU bias
fusion, the init std (weights come from the checkpoint), the sequence length (positions are
checked through max_position_embeddings where a table exists), the vocabulary padding multiple
(the checkpoint stores unpadded tables), and the numerically equivalent softmax options.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from megapre.errors import ConfigError
from megapre.model.config import TransformerConfig

STRICTNESS = ("raise_all", "log_unexpected", "log_all")
STRICTNESS_FLAG = "--dist-ckpt-strictness"
BENIGN = frozenset({"hidden_dropout", "attention_dropout", "attention_backend",
                    "bias_activation_fusion", "init_method_std", "seq_length",
                    "make_vocab_size_divisible_by", "apply_query_key_layer_scaling",
                    "attention_softmax_in_fp32"})
# TransformerConfig fields whose pretrain flag has another name.
FLAG_OF = {"layernorm_epsilon": "--norm-epsilon",
           "activation": "--swiglu/--squared-relu/--erf-gelu",
           "add_bias_linear": "--disable-bias-linear", "add_qkv_bias": "--disable-bias-linear",
           "bias_activation_fusion": "--bias-gelu-fusion"}


class CheckpointMismatchError(ConfigError):
    """The checkpoint does not fit the model (architecture, shapes, names or model kind differ)."""


def _flag(name: str) -> str:
    return FLAG_OF.get(name, "--" + name.replace("_", "-"))


def _compared(name: str, saved: dict, now: dict) -> bool:
    if name in BENIGN or name not in saved:  # absent: saved before the setting existed
        return False
    if name == "max_position_embeddings":  # only a learned table has this many rows
        return "learned_absolute" in (saved.get("position_embedding_type"),
                                      now.get("position_embedding_type"))
    return True


def architecture_diff(saved: dict, current: TransformerConfig) -> list[str]:
    """'--flag X (checkpoint) vs Y (now)' for every setting that changes the tensors or what
    the weights compute."""
    now = dataclasses.asdict(current)
    out = []
    for name in sorted(now):
        if _compared(name, saved, now) and saved[name] != now[name]:
            flag = _flag(name)
            what = flag if flag == "--" + name.replace("_", "-") else f"{flag} ({name})"
            out.append(f"{what} {saved[name]!r} (checkpoint) vs {now[name]!r} (now)")
    return out


@dataclasses.dataclass
class FitReport:
    """What differs between a checkpoint and the model (all ranks' view)."""

    architecture: list[str]
    missing: list[str]  # model tensors the checkpoint lacks
    shapes: list[str]  # tensors in both with different shapes (never loadable)
    unused: list[str]  # checkpoint model tensors the model does not have

    def refused(self, strictness: str) -> bool:
        return bool(self.shapes or (self.missing and strictness != "log_all") or
                    ((self.unused or self.architecture) and strictness == "raise_all"))

    def tensor_problems(self, strictness: str) -> list[str]:
        out = list(self.shapes)
        if strictness != "log_all":
            out += [f"{k!r} is missing from the checkpoint" for k in self.missing]
        if strictness == "raise_all":
            out += self._unused_line()
        return out

    def tolerated(self, strictness: str) -> list[str]:
        out = []
        if strictness != "raise_all":
            out += self.architecture + self._unused_line()
        if strictness == "log_all":
            out += [f"{k!r} is missing from the checkpoint (keeps its initialization)"
                    for k in self.missing]
        return out

    def _unused_line(self) -> list[str]:
        if not self.unused:
            return []
        shown = ", ".join(repr(k) for k in self.unused[:4])
        more = f", ... ({len(self.unused)} in all)" if len(self.unused) > 4 else ""
        return [f"the checkpoint holds model tensors this model does not use: {shown}{more}"]


def _short(items: list[str], n: int = 8) -> str:
    return "; ".join(items[:n]) + (f"; ... ({len(items)} problems)" if len(items) > n else "")


def mismatch_message(path: Any, report: FitReport, strictness: str) -> str:
    """One line: the tensor problems, every setting that differs, and what to do."""
    parts = [_short(report.tensor_problems(strictness))] if report.tensor_problems(strictness) \
        else []
    if report.architecture:
        parts.append("model settings that differ: " + "; ".join(report.architecture))
    else:
        parts.append("the model settings are equal, so the checkpoint is damaged or from "
                     "another program")
    if report.shapes:
        parts.append("a tensor whose shape differs cannot be loaded: build the model with the "
                     "checkpoint's settings")
    else:
        parts.append(f"build the model with the checkpoint's settings, or pass "
                     f"{STRICTNESS_FLAG} log_unexpected (unused tensors, other settings) or "
                     "log_all (also missing tensors) for a deliberate partial load")
    return f"checkpoint {path} does not fit this model: " + ". ".join(parts)


def check_strictness(value: str) -> None:
    if value not in STRICTNESS:
        raise ConfigError(f"{STRICTNESS_FLAG} {value!r}: choose one of {', '.join(STRICTNESS)}")
