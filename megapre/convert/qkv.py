"""megapre's fused query/key/value layout, to and from separate projections.

megapre (like Megatron) stores one `attention.qkv` matrix whose rows are grouped by key/value
head: for each of the G groups, its Q/G query heads, then its key head, then its value head. That
keeps a TP rank's slice of the rows a whole number of groups. Hugging Face models store the
query, key and value projections apart (Llama) or side by side, all queries first (GPT-2)."""
from __future__ import annotations

import torch


def fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int,
         head_dim: int) -> torch.Tensor:
    """[heads*d, ...], [groups*d, ...], [groups*d, ...] -> megapre's [(heads+2*groups)*d, ...]
    (weights [out, in] or biases [out])."""
    rest = q.shape[1:]
    per = q.shape[0] // (groups * head_dim)
    out = torch.empty((groups, per + 2, head_dim, *rest), dtype=q.dtype)
    # one strided copy per part (the inputs may be transposed views of the source file)
    out[:, :per].copy_(q.unflatten(0, (groups, per, head_dim)))
    out[:, per].copy_(k.unflatten(0, (groups, head_dim)))
    out[:, per + 1].copy_(v.unflatten(0, (groups, head_dim)))
    return out.reshape(-1, *rest)


def split(qkv: torch.Tensor, heads: int, groups: int, head_dim: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse`: (q [heads*d, ...], k [groups*d, ...], v [groups*d, ...])."""
    rest = qkv.shape[1:]
    per = heads // groups
    g = qkv.reshape(groups, per + 2, head_dim, *rest)
    q, k, v = torch.split(g, [per, 1, 1], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())
