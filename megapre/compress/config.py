"""What a quantization run does (`--method`, `--alpha`, `--quantize-lm-head`) and the part of it a
quantized checkpoint records in its run config (config.json, key `quantization`), so that every
program that loads the checkpoint builds the int8 layers before reading the weights."""
from __future__ import annotations

import math
from dataclasses import dataclass

from megapre.errors import ConfigError

# method -> how the linear layers of the transformer blocks run
METHODS = {"weight-int8": "weight_only", "w8a8": "w8a8", "smoothquant": "w8a8"}


@dataclass(frozen=True)
class QuantConfig:
    """--method, --alpha (SmoothQuant's migration strength), --quantize-lm-head."""

    method: str
    alpha: float = 0.5
    quantize_lm_head: bool = False

    @property
    def mode(self) -> str:
        """'weight_only' or 'w8a8': the kernel the block linears run."""
        return METHODS[self.method]

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} must be one of {', '.join(METHODS)}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) \
                or not 0.0 <= a <= 1.0:
            raise ConfigError(f"--alpha {a!r} must be a number in [0, 1] (SmoothQuant's "
                              "migration strength; 0.5 is the paper's default)")

    def record(self) -> dict:
        """The entry saved in the checkpoint's run config."""
        return {"method": self.method, "alpha": float(self.alpha),
                "quantize_lm_head": bool(self.quantize_lm_head)}

    @classmethod
    def from_record(cls, record: dict) -> "QuantConfig":
        """Inverse of record (read from a checkpoint's config.json); validated."""
        if not isinstance(record, dict) or "method" not in record:
            raise ConfigError(f"the run config's quantization entry {record!r} is not one "
                              "megapre.compress wrote (expected a method)")
        cfg = cls(record["method"], record.get("alpha", 0.5),
                  bool(record.get("quantize_lm_head", False)))
        cfg.validate()
        return cfg
