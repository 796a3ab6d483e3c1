"""Friendly argument checks for the public ops: errors name the argument, what it got and what
it needs, before any kernel runs."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def floating(name: str, t, allow_fp64: bool = False) -> torch.Tensor:
    tensor(name, t)
    ok = FLOAT_DTYPES + ((torch.float64,) if allow_fp64 else ())
    if t.dtype not in ok:
        names = ", ".join(str(d).replace("torch.", "") for d in ok)
        raise TypeError(f"{name} must have dtype {names}; got {t.dtype}")
    return t


def int8(name: str, t) -> torch.Tensor:
    tensor(name, t)
    if t.dtype != torch.int8:
        raise TypeError(f"{name} must be int8, got {t.dtype} (quantize it with quantize_per_channel "
                        "or quantize_per_token)")
    return t


def same_device(**tensors) -> None:
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devs}")


def vector(name: str, t, n: int) -> None:
    if t is None:
        return
    floating(name, t, allow_fp64=True)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {list(t.shape)}")


def scale_vector(name: str, t, shape) -> None:
    tensor(name, t)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
