"""KL(teacher || student) per token over logits whose vocabulary is split across TP ranks, without
gathering them (knowledge distillation; megapre/train/distill.py).

    p = softmax(teacher / T), q = softmax(student / T), KL = sum_v p_v (log p_v - log q_v)

Each rank holds [..., v0:v1] of the padded vocabulary of both models. Per token the ranks exchange
five scalars (two maxima, two sums of exp, the local KL sum), as the vocab-parallel cross entropy
does (megapre/parallel/cross_entropy.py). Padding columns (>= the true vocab size) take no
probability in either distribution and get a zero gradient. The gradient w.r.t. the student's
logits is (q - p) / T; the teacher gets none.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Group, group_rank, group_size


def _all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _log_softmax(x: torch.Tensor, real: torch.Tensor, group: Group) -> torch.Tensor:
    """Log-softmax over the whole (sharded) vocabulary; padding columns become -inf."""
    x = x.masked_fill(~real, float("-inf"))
    row_max = _all_reduce(x.amax(dim=-1), group, dist.ReduceOp.MAX).unsqueeze(-1)
    x = x - row_max
    sum_exp = _all_reduce(x.exp().sum(dim=-1), group)
    return x - sum_exp.log().unsqueeze(-1)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, group, vocab_size, temperature):
        local = student.size(-1)
        n_real = max(0, min(local, vocab_size - group_rank(group) * local))
        real = torch.arange(local, device=student.device) < n_real
        log_q = _log_softmax(student.float() / temperature, real, group)
        log_p = _log_softmax(teacher.float() / temperature, real, group)
        p = log_p.exp()  # 0 on padding
        kl = torch.where(real, p * (log_p - log_q), torch.zeros((), device=p.device)).sum(-1)
        kl = _all_reduce(kl, group)
        ctx.save_for_backward(log_q, p, real)
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        log_q, p, real = ctx.saved_tensors
        grad = (log_q.exp() - p).masked_fill_(~real, 0.0)
        grad.mul_(grad_kl.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_kl_divergence(student: torch.Tensor, teacher: torch.Tensor, group: Group, *,
                                 vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(softmax(teacher/T) || softmax(student/T)) (fp32, the logits' shape without
    the vocab dim) of TP-sharded logits [..., padded_vocab / tp]; differentiable in `student`.
    Scaling by T^2 and averaging with a loss mask are the caller's."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ in shape (same padded vocabulary and "
                         "layout needed)")
    if temperature <= 0:
        raise ValueError(f"--kd-temperature must be > 0, got {temperature}")
    if not 0 < vocab_size <= student.size(-1) * group_size(group):
        raise ValueError(f"vocab_size {vocab_size} must be in [1, padded "
                         f"{student.size(-1) * group_size(group)}]")
    return _VocabParallelKL.apply(student, teacher.detach(), group, vocab_size,
                                  float(temperature))
