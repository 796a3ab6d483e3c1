"""Point-to-point hand-off of hidden states between pipeline stages during generation, where the
shape changes every step (prompt, then one position at a time, or a sliding window): each tensor
is preceded by a small header with its rank, dtype and shape, so the receiver needs no schedule."""
from __future__ import annotations

import torch
import torch.distributed as dist

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_DIMS = 8


def send_tensor(x: torch.Tensor, dst: int) -> None:
    if x.dim() > _MAX_DIMS or x.dtype not in _DTYPES:
        raise ValueError(f"cannot send a {x.dim()}-d {x.dtype} tensor between stages")
    header = torch.zeros(2 + _MAX_DIMS, dtype=torch.long, device=x.device)
    header[0], header[1] = x.dim(), _DTYPES.index(x.dtype)
    header[2:2 + x.dim()] = torch.tensor(x.shape, dtype=torch.long)
    dist.send(header, dst)
    dist.send(x.contiguous(), dst)


def recv_tensor(src: int, device: torch.device) -> torch.Tensor:
    header = torch.empty(2 + _MAX_DIMS, dtype=torch.long, device=device)
    dist.recv(header, src)
    ndim, code = int(header[0]), int(header[1])
    x = torch.empty(header[2:2 + ndim].tolist(), dtype=_DTYPES[code], device=device)
    dist.recv(x, src)
    return x
