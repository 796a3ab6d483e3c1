"""Context parallelism: every sequence split over the CP group, self-attention run as a ring.

Zig-zag split (Megatron's load balancing). The sequence is cut into 2 x CP equal chunks and CP
rank r holds chunks r and 2 x CP - 1 - r, in that order. Under a causal mask an early chunk
attends to few keys and a late one to many; pairing them gives every rank the same work.

Ring attention. Each rank keeps its queries and passes its key/value block to the next rank of
the ring (point-to-point send/recv), so after CP - 1 hops every query has met every key while no
rank ever holds more than two K/V blocks. The partial softmaxes are merged online (running max,
running sum, rescaled accumulator: the log-sum-exp merge), so the result is exact attention, not
an approximation. Work is skipped per half-block: a query chunk never computes against a later
key chunk, and the diagonal chunk gets the triangular mask; positions are the tokens' true ones.

Backward recomputes each block's probabilities from the saved log-sum-exp (nothing of size
s x s is kept) and walks the ring again: dQ accumulates locally, while each block's dK/dV travels
behind its K/V, collecting every rank's contribution, and arrives at its owner after CP hops.

Grouped-query K/V travel with their own (fewer) heads and are expanded per block. Computation is
plain torch matmuls with fp32 (fp64 for fp64 inputs) softmax statistics and accumulators,
autocast off inside, so it is exact in fp32 on any device. Attention dropout is not drawn
(refused by the layout rules).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .mesh import ParallelMesh

_TAG_KV, _TAG_DKV = 7101, 7102  # gloo matches messages by tag: K/V and their grads cross


# -- the zig-zag split ---------------------------------------------------------------------------

def zigzag_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two sequence chunks (of 2 x cp) CP rank `rank` holds."""
    return rank, 2 * cp - 1 - rank


def _check_split(seq_length: int, cp: int) -> int:
    if seq_length % (2 * cp):
        raise ValueError(f"a sequence of {seq_length} tokens cannot be cut into 2 x "
                         f"--context-parallel-size {cp} = {2 * cp} equal chunks")
    return seq_length // (2 * cp)


def zigzag_positions(seq_length: int, cp: int, rank: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """True positions (0 .. seq_length-1) of the tokens CP rank `rank` holds, in its order."""
    c = _check_split(seq_length, cp)
    a, b = zigzag_chunks(cp, rank)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device),
                      torch.arange(b * c, (b + 1) * c, device=device)])


def split_sequence(x: torch.Tensor, dim: int, cp: int, rank: int) -> torch.Tensor:
    """CP rank `rank`'s zig-zag share of `x` along the sequence dimension `dim`."""
    if cp == 1:
        return x
    _check_split(x.shape[dim], cp)
    chunks = x.chunk(2 * cp, dim)
    a, b = zigzag_chunks(cp, rank)
    return torch.cat([chunks[a], chunks[b]], dim)


def merge_sequence(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of split_sequence: the full sequence from every CP rank's share, in rank order."""
    halves = [p.chunk(2, dim) for p in parts]
    ordered = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
    return torch.cat(ordered, dim)


# -- the ring ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContextGroup:
    """This rank's place in the CP ring: the group, its global ranks in CP order, our index."""

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]
    rank: int

    @classmethod
    def from_mesh(cls, mesh: ParallelMesh) -> "ContextGroup | None":
        """The ring of `mesh`, or None without context parallelism."""
        if mesh.cp_size == 1:
            return None
        return cls(mesh.cp_group, tuple(mesh.cp_ranks), mesh.cp_rank)

    @classmethod
    def single(cls) -> "ContextGroup":
        """A ring of one (no communication): the block math on a whole sequence."""
        return cls(None, (0,), 0)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def exchange(self, send: torch.Tensor, tag: int) -> "_Pending":
        """Send `send` to the next rank, receive the previous rank's tensor of the same shape."""
        recv = torch.empty_like(send)
        nxt = self.ranks[(self.rank + 1) % self.size]
        prev = self.ranks[(self.rank - 1) % self.size]
        ops = [dist.P2POp(dist.irecv, recv, prev, self.group, tag),
               dist.P2POp(dist.isend, send, nxt, self.group, tag)]
        return _Pending(recv, send, dist.batch_isend_irecv(ops))


class _Pending:
    """An exchange in flight; `wait()` returns the received tensor. Holds the send buffer so
    it is not freed or reused before the send completes."""

    def __init__(self, recv: torch.Tensor, send: torch.Tensor, works: list) -> None:
        self.recv, self.send, self.works = recv, send, works

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        return self.recv


def _blocks(q_rank: int, kv_rank: int, cp: int, causal: bool
            ) -> Iterator[tuple[int, int, int, bool]]:
    """(query half, key half, key chunk, diagonal) of each half-block with a visible key."""
    q_chunks, k_chunks = zigzag_chunks(cp, q_rank), zigzag_chunks(cp, kv_rank)
    for qa in (0, 1):
        for kb in (0, 1):
            if causal and k_chunks[kb] > q_chunks[qa]:
                continue  # every key of the block lies after every query: fully masked
            yield qa, kb, k_chunks[kb], causal and k_chunks[kb] == q_chunks[qa]


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, diagonal: bool,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled scores of one half-block (fp32 at least), masked entries -inf."""
    s = torch.matmul(q, k.transpose(-1, -2)).to(_acc(q)) * scale
    if diagonal:
        c = s.shape[-1]
        s = s.masked_fill(torch.ones(c, c, dtype=torch.bool, device=s.device).triu(1),
                          float("-inf"))
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return s


def _mask_block(mask: torch.Tensor | None, rows: slice, key_chunk: int, c: int
                ) -> torch.Tensor | None:
    """The half-block of a mask [b or 1, 1, s/cp or 1, s or 1] whose columns are the full
    sequence in true order."""
    if mask is None:
        return None
    m = mask[:, :, rows] if mask.shape[2] > 1 else mask
    return m[..., key_chunk * c:(key_chunk + 1) * c] if m.shape[-1] > 1 else m


def _acc(t: torch.Tensor) -> torch.dtype:
    """Softmax statistics and accumulators: fp32, or the input's dtype when wider (fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _expand(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Gradient of _expand: sum each key/value head's group of query heads."""
    if groups == 1:
        return t
    b, nh, s, d = t.shape
    return t.view(b, nh // groups, groups, s, d).sum(2)


def _ring_forward(q, k, v, mask, ring: ContextGroup, scale: float, causal: bool):
    b, nh, sl, d = q.shape
    c, groups, dt = sl // 2, nh // k.shape[1], _acc(q)
    acc = torch.zeros(b, nh, sl, d, dtype=dt, device=q.device)
    run_max = torch.full((b, nh, sl), float("-inf"), dtype=dt, device=q.device)
    run_sum = torch.zeros(b, nh, sl, dtype=dt, device=q.device)
    kv = torch.stack([k, v])
    for i in range(ring.size):
        src = (ring.rank - i) % ring.size
        pending = ring.exchange(kv, _TAG_KV) if i < ring.size - 1 else None
        kk, vv = _expand(kv[0], groups), _expand(kv[1], groups)
        for qa, kb, key_chunk, diag in _blocks(ring.rank, src, ring.size, causal):
            rows, cols = slice(qa * c, (qa + 1) * c), slice(kb * c, (kb + 1) * c)
            s = _scores(q[:, :, rows], kk[:, :, cols], scale, diag,
                        _mask_block(mask, rows, key_chunk, c))
            old = run_max[:, :, rows]
            new = torch.maximum(old, s.amax(-1))
            safe = new.masked_fill(new == float("-inf"), 0.0)  # rows with nothing visible yet
            alpha = torch.exp(old - safe)
            p = torch.exp(s - safe[..., None])
            run_sum[:, :, rows] = run_sum[:, :, rows] * alpha + p.sum(-1)
            acc[:, :, rows] = (acc[:, :, rows] * alpha[..., None]
                               + torch.matmul(p.to(vv.dtype), vv[:, :, cols]).to(dt))
            run_max[:, :, rows] = new
        if pending is not None:
            kv = pending.wait()
    seen = run_sum > 0  # a query whose keys are all masked gets zeros (as the fused kernel)
    out = torch.where(seen[..., None], acc / run_sum.clamp_min(1e-30)[..., None], 0.0)
    lse = torch.where(seen, run_max + torch.log(run_sum.clamp_min(1e-30)), float("-inf"))
    return out, lse


def _ring_backward(q, k, v, out, lse, mask, dout, ring: ContextGroup, scale: float,
                   causal: bool):
    b, nh, sl, d = q.shape
    c, groups, dt = sl // 2, nh // k.shape[1], _acc(q)
    dout = dout.to(dt)
    delta = (dout * out.to(dt)).sum(-1)  # rowsum(dO * O), the softmax backward's correction
    lse = lse.masked_fill(lse == float("-inf"), 0.0)  # fully masked rows: p = exp(-inf) = 0
    dq = torch.zeros(b, nh, sl, d, dtype=dt, device=q.device)
    kv = torch.stack([k, v])
    partial = None  # the dK/dV exchange in flight (this block's grads from the previous ranks)
    for i in range(ring.size):
        src = (ring.rank - i) % ring.size
        pending = ring.exchange(kv, _TAG_KV) if i < ring.size - 1 else None
        kk, vv = _expand(kv[0], groups), _expand(kv[1], groups)
        dk = torch.zeros(b, nh, sl, d, dtype=dt, device=q.device)
        dv = torch.zeros_like(dk)
        for qa, kb, key_chunk, diag in _blocks(ring.rank, src, ring.size, causal):
            rows, cols = slice(qa * c, (qa + 1) * c), slice(kb * c, (kb + 1) * c)
            s = _scores(q[:, :, rows], kk[:, :, cols], scale, diag,
                        _mask_block(mask, rows, key_chunk, c))
            p = torch.exp(s - lse[:, :, rows, None])
            do = dout[:, :, rows]
            dv[:, :, cols] += torch.matmul(p.transpose(-1, -2), do)
            dp = torch.matmul(do, vv[:, :, cols].to(dt).transpose(-1, -2))
            ds = p * (dp - delta[:, :, rows, None]) * scale
            dq[:, :, rows] += torch.matmul(ds, kk[:, :, cols].to(dt))
            dk[:, :, cols] += torch.matmul(ds.transpose(-1, -2), q[:, :, rows].to(dt))
        grads = torch.stack([_fold(dk, groups), _fold(dv, groups)])
        if partial is not None:
            grads += partial.wait()
        partial = ring.exchange(grads, _TAG_DKV) if ring.size > 1 else None
        if pending is not None:
            kv = pending.wait()
    # After CP hops the last exchange delivers this rank's own block, summed over every rank.
    dkv = partial.wait() if partial is not None else grads
    return dq, dkv[0], dkv[1]


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.permute(1, 2, 0, 3)  # [s, b, heads, d] -> [b, heads, s, d] (a view)


class _RingAttention(torch.autograd.Function):
    """Saves its inputs, its output (which the caller's [s, b, h] context is a view of, so it
    costs no extra memory) and the fp32 log-sum-exp: nothing of size s x s."""

    @staticmethod
    def forward(ctx, q, k, v, mask, ring, scale, causal):
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _ring_forward(*map(_heads_first, (q, k, v)), mask, ring, scale, causal)
        out = out.permute(2, 0, 1, 3).to(q.dtype).contiguous()  # [s, b, heads, d]
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.ring, ctx.scale, ctx.causal = ring, scale, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _ring_backward(*map(_heads_first, (q, k, v, out)), lse, mask,
                                        _heads_first(dout), ctx.ring, ctx.scale, ctx.causal)
        grads = [g.permute(2, 0, 1, 3).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v))]
        return (*grads, None, None, None, None)


class _BroadcastFromFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ring):
        ctx.ring = ring
        out = x.detach().clone().contiguous()
        dist.broadcast(out, ring.ranks[0], group=ring.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.ring.group)
        return (grad if ctx.ring.rank == 0 else torch.zeros_like(grad)), None


def broadcast_from_first(x: torch.Tensor, ring: ContextGroup) -> torch.Tensor:
    """CP rank 0's `x` on every CP rank (e.g. BERT's [CLS] state, token 0 of the sequence);
    backward sums every rank's gradient into CP rank 0's input (the others' get zeros)."""
    return _BroadcastFromFirst.apply(x, ring)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: ContextGroup, *,
                   scale: float, causal: bool, mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the whole sequence, from this rank's zig-zag share.

    q [s/cp, b, heads, d]; k, v [s/cp, b, kv heads, d] (heads a multiple of kv heads; Megatron's
    sequence-first layout); mask bool [b or 1, 1, s/cp or 1, s or 1], True = masked, rows this
    rank's queries and columns the full sequence in true order (added to the causal mask when
    `causal`). Collective over the ring: every CP rank calls it with the same shapes. Returns
    [s/cp, b, heads, d], contiguous.
    """
    if q.shape[0] % 2:
        raise ValueError(f"ring attention needs an even local sequence (two zig-zag chunks), "
                         f"got {q.shape[0]}")
    return _RingAttention.apply(q, k, v, mask, ring, scale, causal)
