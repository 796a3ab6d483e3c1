"""Point-to-point tensors of any shape between pipeline ranks, for forward-only walks over the
stages whose shapes change per call (generation: the prompt, then one position at a time).
A fixed-size header (rank, dtype, shape) precedes the data, so the receiver needs no agreed
buffer shape and no schedule. Training and evaluation use torch.distributed.pipelining instead,
whose buffers are sized once from example tensors."""
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
