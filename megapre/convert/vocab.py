"""Vocabulary tables between a Hugging Face model (exactly vocab_size rows) and megapre's (padded
to a multiple of --make-vocab-size-divisible-by; padding rows are zero and never predicted)."""
from __future__ import annotations

import torch

from megapre.model.config import ConfigError
from megapre.train.state_dict import VOCAB_TABLES


def is_vocab_table(name: str) -> bool:
    return name in VOCAB_TABLES


@torch.no_grad()
def write_padded(param: torch.nn.Parameter, tensor: torch.Tensor, name: str,
                 adopt: bool = False) -> None:
    """Copy `tensor` into `param`; a vocabulary table fills the first rows, the padding is zero.
    `adopt`: the caller hands `tensor` over (a fresh read), so when it already has the
    parameter's shape, dtype, device and a dense layout it becomes the parameter's storage: no
    second pass over the model's memory, and the parameter's own allocation is never touched."""
    if is_vocab_table(name) and tensor.dim() == param.dim() and \
            tensor.shape[1:] == param.shape[1:] and tensor.shape[0] <= param.shape[0]:
        param[: tensor.shape[0]].copy_(tensor)
        param[tensor.shape[0]:].zero_()
        return
    if tuple(tensor.shape) != tuple(param.shape):
        raise ConfigError(f"{name}: the source tensor has shape {tuple(tensor.shape)}, megapre's "
                          f"model expects {tuple(param.shape)} (config.json and weights "
                          "disagree?)")
    if adopt and _owns_storage(tensor) and tensor.dtype == param.dtype and \
            tensor.device == param.device and type(param.data) is torch.Tensor:
        param.data = tensor
        return
    param.copy_(tensor)


def _owns_storage(t: torch.Tensor) -> bool:
    """Dense and alone in its storage (a view of a larger tensor would keep, and save, all of it)."""
    return t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()


def unpadded(tensor: torch.Tensor, name: str, vocab_size: int) -> torch.Tensor:
    return tensor[:vocab_size] if is_vocab_table(name) else tensor
