"""Where a task model's weights come from, and what its checkpoints hold.

    fresh run    backbone (and BERT's pretrained pooler) from --pretrained-checkpoint; the
                 classifier (and LoRA adapters) keep their initialization; the pretrained LM
                 head is left in the checkpoint
    resume       full fine-tuning / linear probe: everything from the fine-tuned checkpoint;
                 LoRA: the base from the pretrained checkpoint, then adapters + head from the
                 fine-tuned one (which holds only those: a few percent of the model)

A LoRA checkpoint records a fingerprint of the base weights it was trained on (float64 sum and
sum of squares over every base parameter, layout-independent), so adapters are never loaded
onto another base model, even one of the same shape.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megapre.errors import ConfigError
from megapre.parallel.comm import group_size

from .checkpoint import load_checkpoint
from .parallel_model import ParallelModel

CLASSIFIER = "heads.classifier."
POOLER = "heads.pooler."
FINGERPRINT_RTOL = 1e-9


def is_lora(name: str) -> bool:
    return ".lora_" in name


def pretrained_keys(has_pooler: bool) -> Callable[[str], bool]:
    """What a pretraining checkpoint provides: every backbone tensor, the pooler when the
    pretrained BERT had a sentence-order head; never the classifier or LoRA adapters."""
    def select(name: str) -> bool:
        if is_lora(name) or name.startswith(CLASSIFIER):
            return False
        return has_pooler or not name.startswith(POOLER)
    return select


def adapter_keys(name: str) -> bool:
    """What a LoRA fine-tuning checkpoint holds: the adapters and the head."""
    return is_lora(name) or name.startswith("heads.")


def load_pretrained(path: Path, model: ParallelModel, has_pooler: bool) -> dict:
    """Backbone weights of a pretraining checkpoint into a task model (any layout). Collective."""
    return load_checkpoint(path, model, None, model.mesh, load_rng=False,
                           select=pretrained_keys(has_pooler), partial=True)


def base_fingerprint(model: ParallelModel) -> list[float]:
    """[sum, sum of squares] in float64 over every non-adapter, non-head parameter, as if the
    model were one tensor: the same in every layout up to summation order. Collective."""
    mesh = model.mesh
    acc = torch.zeros(2, dtype=torch.float64)
    for m in model.models:
        for name, p in m.named_parameters():
            if is_lora(name) or name.startswith("heads."):
                continue
            sharded = getattr(p, "tensor_parallel_dim", None) is not None
            if not sharded and mesh.tp_rank != 0:
                continue  # replicated over TP: count once
            x = p.detach().double()
            acc += torch.stack([x.sum(), (x * x).sum()]).cpu()
    acc = acc.to(mesh.device)
    for group in (mesh.tp_group, mesh.pp_group):
        if group_size(group) > 1:
            dist.all_reduce(acc, group=group)
    return acc.cpu().tolist()


def check_fingerprint(saved: list[float] | None, now: list[float], base: str, adapters: str
                      ) -> None:
    if not saved:
        return
    if any(not math.isclose(a, b, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-12)
           for a, b in zip(saved, now)):
        raise ConfigError(f"the LoRA adapters in {adapters} were trained on other base weights "
                          f"than {base} holds (weight fingerprint {saved} vs {now}); pass the "
                          "pretrained checkpoint they were trained from as "
                          "--pretrained-checkpoint")
