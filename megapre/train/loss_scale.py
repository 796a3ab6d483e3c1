"""Dynamic loss scaling for fp16 training (Megatron / apex semantics).

The loss is multiplied by `scale` before backward so small fp16 gradients do not flush to zero;
gradients are divided by it before clipping and the optimizer step. A step whose gradients
overflow (non-finite global norm, decided on all ranks together by the norm's all-reduce) is
skipped and halves the scale; `growth_interval` clean steps in a row double it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DynamicLossScaler:
    scale: float = 2.0 ** 16
    growth_interval: int = 1000
    backoff: float = 0.5
    growth: float = 2.0
    min_scale: float = 1.0
    clean_steps: int = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale * self.backoff, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth
            self.clean_steps = 0

    def unscale_(self, params) -> None:
        inv = 1.0 / self.scale
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, type(getattr(self, k))(v))
