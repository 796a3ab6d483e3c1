"""Vocabulary tables between a Hugging Face model (exactly vocab_size rows) and megapre's (padded
to a multiple of --make-vocab-size-divisible-by; padding rows are zero and never predicted)."""
from __future__ import annotations

import torch

from megapre.model.config import ConfigError
from megapre.train.state_dict import VOCAB_TABLES


def is_vocab_table(name: str) -> bool:
    return name in VOCAB_TABLES


@torch.no_grad()
def write_padded(param: torch.nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    """Copy `tensor` into `param`; a vocabulary table fills the first rows, the padding is zero."""
    if is_vocab_table(name) and tensor.dim() == param.dim() and \
            tensor.shape[1:] == param.shape[1:] and tensor.shape[0] <= param.shape[0]:
        param[: tensor.shape[0]].copy_(tensor)
        param[tensor.shape[0]:].zero_()
        return
    if tuple(tensor.shape) != tuple(param.shape):
        raise ConfigError(f"{name}: the source tensor has shape {tuple(tensor.shape)}, megapre's "
                          f"model expects {tuple(param.shape)} (config.json and weights "
                          "disagree?)")
    param.copy_(tensor)


def unpadded(tensor: torch.Tensor, name: str, vocab_size: int) -> torch.Tensor:
    return tensor[:vocab_size] if is_vocab_table(name) else tensor
