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
    """`hysteresis`: overflows tolerated before the first back-off (Megatron's --hysteresis;
    the count is refilled only when the scale grows, as in megatron-core's DynamicGradScaler)."""

    scale: float = 2.0 ** 16
    growth_interval: int = 1000
    backoff: float = 0.5
    growth: float = 2.0
    min_scale: float = 1.0
    clean_steps: int = 0
    hysteresis: int = 1
    hysteresis_left: int | None = None

    def __post_init__(self) -> None:
        if self.hysteresis_left is None:
            self.hysteresis_left = self.hysteresis

    @classmethod
    def static(cls, scale: float) -> "DynamicLossScaler":
        """Megatron's --loss-scale S: a fixed scale (an overflowing step is still skipped)."""
        return cls(scale=scale, min_scale=scale, growth=1.0)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth
            self.clean_steps = 0
            self.hysteresis_left = self.hysteresis

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
