"""Cross entropy over logits whose vocabulary is split across TP ranks, without gathering them.

Each rank holds logits[..., v0:v1] of the padded vocabulary. Per token the ranks exchange only
three scalars (max, sum of exp, target logit; plus the sum of logits for label smoothing), so the
[tokens, vocab] matrix is never all-gathered. Math in fp32 with the max subtracted, so large
logits neither overflow nor lose precision. Padding columns (>= the true vocab size) are masked
to -inf: they never win the max, take no probability, and get a zero gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Group, group_rank, group_size


def _all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, label_smoothing, ignore_index):
        local = logits.size(-1)
        start = group_rank(group) * local
        n_real = max(0, min(local, vocab_size - start))  # real columns are a prefix
        real = torch.arange(local, device=logits.device) < n_real
        x = logits.float()
        if n_real < local:
            x = x.masked_fill(~real, float("-inf"))

        ignored = target == ignore_index if ignore_index is not None else None
        local_t = target - start
        mine = (local_t >= 0) & (local_t < local)
        if ignored is not None:
            mine &= ~ignored
        idx = local_t.masked_fill(~mine, 0).unsqueeze(-1)

        if group_size(group) == 1:
            # whole vocabulary here: torch's fused log-softmax is one pass per row
            logp = torch.log_softmax(x, dim=-1)
            loss = -torch.gather(logp, -1, idx).squeeze(-1).masked_fill(~mine, 0.0)
            if label_smoothing > 0:
                smooth = -logp[..., :n_real].sum(dim=-1) / vocab_size
                loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
            saved, ctx.log_space = logp, True
        else:
            loss, saved = _sharded_loss(x, idx, mine, n_real, group, vocab_size,
                                        label_smoothing, owned=x is not logits)
            ctx.log_space = False
        if ignored is not None:
            loss = loss.masked_fill(ignored, 0.0)

        ctx.save_for_backward(saved, idx, mine, real, ignored)
        ctx.label_smoothing, ctx.vocab_size = label_smoothing, vocab_size
        ctx.logits_dtype = logits.dtype
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:  # the saved softmax became the gradient in place
            raise RuntimeError("vocab_parallel_cross_entropy cannot be back-propagated twice "
                               "(retain_graph=True); compute the loss again instead")
        ctx.consumed = True
        saved, idx, mine, real, ignored = ctx.saved_tensors
        e = ctx.label_smoothing
        grad = saved.exp_() if ctx.log_space else saved  # softmax, in place
        hit = mine.to(grad.dtype).unsqueeze(-1) * (1.0 - e)
        grad.scatter_add_(-1, idx, -hit)
        if e > 0:
            grad.sub_(real.to(grad.dtype) * (e / ctx.vocab_size))
        grad.mul_(grad_loss.unsqueeze(-1))
        if ignored is not None:
            grad.masked_fill_(ignored.unsqueeze(-1), 0.0)
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def _sharded_loss(x, idx, mine, n_real, group, vocab_size, label_smoothing, owned):
    """Loss and softmax (to reuse in backward) of logits sharded over the TP ranks; three
    scalars per token cross ranks. `owned`: x is a private copy that may be overwritten."""
    # Max over the whole vocab, subtracted for stability (a row's max is always a real logit).
    row_max = _all_reduce(x.amax(dim=-1), group, dist.ReduceOp.MAX).unsqueeze(-1)
    x = x.sub_(row_max) if owned else x - row_max
    target_logit = torch.gather(x, -1, idx).squeeze(-1).masked_fill(~mine, 0.0)
    target_logit = _all_reduce(target_logit, group)
    sum_x = None
    if label_smoothing > 0:
        sum_x = _all_reduce(x[..., :n_real].sum(dim=-1), group)
    exp = x.exp_()  # x is a fresh tensor by now
    sum_exp = _all_reduce(exp.sum(dim=-1), group)
    log_z = sum_exp.log()
    loss = log_z - target_logit
    if sum_x is not None:
        # F.cross_entropy: (1 - e) * nll + e * mean over the V true classes of -log p_i.
        smooth = log_z - sum_x / vocab_size
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    return loss, exp.div_(sum_exp.unsqueeze(-1))


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Group, *,
                                 vocab_size: int, padded_vocab_size: int,
                                 label_smoothing: float = 0.0,
                                 ignore_index: int | None = None) -> torch.Tensor:
    """Per-token loss (fp32, shape of `target`) of TP-sharded logits [..., padded_vocab / tp].

    `vocab_size` is the tokenizer's true vocabulary; `padded_vocab_size` the padded size the
    output layer was built with. Targets equal to `ignore_index` get loss 0 and no gradient.
    Averaging (with a loss mask) is the caller's choice, as in Megatron.
    """
    tp = group_size(group)
    local = logits.size(-1)
    if tp > 1 and local == padded_vocab_size:
        raise ValueError(
            f"vocab_parallel_cross_entropy got logits with the full padded vocabulary "
            f"({local}) on each of {tp} TP ranks: they were already gathered. Pass the "
            "output-layer logits sharded over TP (ColumnParallelLinear with gather_output=False)")
    if local * tp != padded_vocab_size:
        raise ValueError(
            f"logits have {local} vocabulary columns per rank x {tp} TP ranks = {local * tp}, "
            f"but the padded vocabulary is {padded_vocab_size}")
    if not 0 < vocab_size <= padded_vocab_size:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, padded {padded_vocab_size}]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)} without the vocab dim")
    valid = (target >= 0) & (target < vocab_size)
    if ignore_index is not None:
        valid |= target == ignore_index
    if not bool(valid.all()):
        bad = target[~valid][:5].tolist()
        raise ValueError(f"targets must lie in [0, {vocab_size}) (or equal ignore_index "
                         f"{ignore_index}); found {bad}")
    return _VocabParallelCE.apply(logits, target, group, vocab_size, float(label_smoothing),
                                  ignore_index)
