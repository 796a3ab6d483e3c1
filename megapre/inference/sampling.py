"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Sampling runs in float32 on the CPU with an explicit `torch.Generator`, so the same seed gives
the same tokens on every rank and every device type (a GPU run samples like a CPU run from the
same logits). Columns at or beyond the real vocabulary (TP padding) are never chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


# Below this, logits / temperature overflows float32 for ordinary logits and softmax gives NaN;
# at it, sampling is already greedy in all but exact ties. Smaller values are refused, not
# silently turned greedy, so the output matches what was asked for.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingConfig:
    """--greedy (or --temperature 0) takes the argmax; otherwise sample from
    softmax(logits / temperature) restricted to the top_k tokens (0 = all) and to the smallest
    set whose probability reaches top_p (1.0 = all)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"--temperature {self.temperature} must be a number >= 0 "
                             "(0 means greedy)")
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"--temperature {self.temperature} is too small to sample with (logits / "
                f"temperature overflow float32); use >= {MIN_TEMPERATURE:g}, or 0 (or --greedy) "
                "for the most likely token")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1] (1 keeps every token)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def mask_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-inf in the columns >= vocab_size (the TP padding of the output layer)."""
    if logits.shape[-1] > vocab_size:
        logits = logits.clone()
        logits[..., vocab_size:] = float("-inf")
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (ties broken by index), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, index = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sum reaches p (the most
    likely token always stays), -inf elsewhere."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filtered_logits(logits: torch.Tensor, cfg: SamplingConfig, vocab_size: int) -> torch.Tensor:
    """The logits sampling draws from: padding masked, temperature applied, top-k then top-p."""
    logits = mask_padding(logits.detach().float().cpu(), vocab_size)
    if cfg.is_greedy:
        return logits
    logits = logits / cfg.temperature
    return top_p_filter(top_k_filter(logits, cfg.top_k), cfg.top_p)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, vocab_size: int,
                generator: torch.Generator) -> torch.Tensor:
    """logits [b, V] (V >= vocab_size; extra columns are padding) -> next ids [b] (int64, CPU)."""
    logits = filtered_logits(logits, cfg, vocab_size)
    if cfg.is_greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
