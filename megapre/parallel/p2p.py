"""Point-to-point tensors of any shape between pipeline ranks: a small header (rank count, dtype,
shape) precedes the data, so the receiver needs no agreed buffer shape. Used by forward-only
walks over the stages (generation, sequential evaluation), where shapes change per call."""
from __future__ import annotations

import torch
import torch.distributed as dist

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def send_tensor(x: torch.Tensor, dst: int) -> None:
    header = torch.tensor([x.dim(), _DTYPES.index(x.dtype), *x.shape], dtype=torch.long)
    dist.send(torch.tensor([header.numel()], dtype=torch.long, device=x.device), dst)
    dist.send(header.to(x.device), dst)
    dist.send(x.contiguous(), dst)


def recv_tensor(src: int, device: torch.device) -> torch.Tensor:
    n = torch.empty(1, dtype=torch.long, device=device)
    dist.recv(n, src)
    header = torch.empty(int(n), dtype=torch.long, device=device)
    dist.recv(header, src)
    ndim, code = int(header[0]), int(header[1])
    x = torch.empty(header[2:2 + ndim].tolist(), dtype=_DTYPES[code], device=device)
    dist.recv(x, src)
    return x
