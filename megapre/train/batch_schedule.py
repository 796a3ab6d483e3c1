"""Megatron's --step-batch-size-schedule: the global batch size as a step function of the
samples consumed so far, e.g. "0:16 2.4B:320 12B:1536" (thresholds in tokens, converted to
samples with --seq-length, as megatron-core does; K/M/B/T suffixes). The run's nominal global
batch size is the last entry's; the learning-rate schedule counts samples, so it follows the
same curve as Megatron's whatever the batch sizes on the way."""
from __future__ import annotations

from dataclasses import dataclass

from megapre.errors import ConfigError

FLAG = "--step-batch-size-schedule"
_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _number(text: str, entry: str) -> int:
    body, mult = text.strip().upper(), 1
    if body and body[-1] in _SUFFIX:
        body, mult = body[:-1], _SUFFIX[body[-1]]
    try:
        return int(float(body) * mult)
    except ValueError:
        raise ConfigError(f"{FLAG}: {entry!r} is not THRESHOLD:BATCH_SIZE (numbers with optional "
                          "K/M/B/T, e.g. 2.4B:320)") from None


@dataclass(frozen=True)
class BatchSchedule:
    """(first sample, global batch size) steps, thresholds ascending from 0."""

    steps: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, text: str, seq_length: int) -> "BatchSchedule":
        steps = []
        for entry in text.replace(",", " ").split():
            if ":" not in entry:
                raise ConfigError(f"{FLAG}: {entry!r} is not THRESHOLD:BATCH_SIZE")
            tokens, size = entry.split(":", 1)
            steps.append((_number(tokens, entry) // seq_length, _number(size, entry)))
        steps.sort()
        if not steps or steps[0][0] != 0:
            raise ConfigError(f"{FLAG} {text!r}: the first entry must start at 0 tokens")
        for (a, _), (b, _) in zip(steps, steps[1:]):
            if b <= a:
                raise ConfigError(f"{FLAG} {text!r}: thresholds must be strictly increasing "
                                  f"(in samples of --seq-length {seq_length})")
        return cls(tuple(steps))

    def at(self, consumed_samples: int) -> int:
        """The global batch size of the step that starts after `consumed_samples`."""
        size = self.steps[0][1]
        for threshold, bs in self.steps:
            if consumed_samples < threshold:
                break
            size = bs
        return size

    @property
    def final(self) -> int:
        return self.steps[-1][1]

    @property
    def largest(self) -> int:
        return max(bs for _, bs in self.steps)

    def check(self, micro_batch_size: int, dp: int) -> None:
        """Every batch size must split into whole micro-batches over DP (megatron-core checks
        each as it is reached; megapre before the run)."""
        per_step = micro_batch_size * dp
        for _, bs in self.steps:
            if bs % per_step:
                raise ConfigError(f"{FLAG}: batch size {bs} is not a multiple of "
                                  f"--micro-batch-size {micro_batch_size} x data-parallel size "
                                  f"{dp} = {per_step}")

    def samples_for(self, iterations: int) -> int:
        """Samples consumed by `iterations` steps."""
        consumed = 0
        for _ in range(iterations):
            consumed += self.at(consumed)
        return consumed
