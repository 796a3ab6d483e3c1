"""The vocab-parallel KL of distillation equals torch's F.kl_div on the gathered logits (padding
columns dropped), in value and in the student's gradient, under TP1 and TP2; the padding columns
take nothing and get a zero gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megapre.parallel.kl_divergence import vocab_parallel_kl_divergence
from megapre.parallel.testing import run_distributed

VOCAB, PADDED, T = 13, 16, 2.0


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 3, PADDED, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(5, 3, PADDED, generator=g, dtype=torch.float64) * 3
    student[..., VOCAB:] = 50.0  # padding columns: huge logits that must not count
    teacher[..., VOCAB:] = -7.0
    return student, teacher


def _reference() -> tuple[torch.Tensor, torch.Tensor]:
    student, teacher = _logits()
    s = student[..., :VOCAB].clone().requires_grad_(True)
    log_q = F.log_softmax(s / T, dim=-1)
    log_p = F.log_softmax(teacher[..., :VOCAB] / T, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    kl.sum().backward()
    return kl.detach(), s.grad


def _sharded(rank: int, world: int):
    student, teacher = _logits()
    width = PADDED // world
    mine = slice(rank * width, (rank + 1) * width)
    s = student[..., mine].clone().requires_grad_(True)
    group = torch.distributed.group.WORLD if world > 1 else None
    kl = vocab_parallel_kl_divergence(s, teacher[..., mine], group, vocab_size=VOCAB,
                                      temperature=T)
    kl.sum().backward()
    return kl.detach(), s.grad


def test_single_rank_matches_kl_div():
    kl, grad = _sharded(0, 1)
    ref_kl, ref_grad = _reference()
    torch.testing.assert_close(kl.double(), ref_kl, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad[..., :VOCAB].double(), ref_grad, rtol=0, atol=1e-6)
    assert bool((grad[..., VOCAB:] == 0).all())


def test_tp2_matches_kl_div_without_gathering():
    ref_kl, ref_grad = _reference()
    results = run_distributed(_sharded, 2)
    grads = torch.cat([g for _, g in results], dim=-1)
    for kl, _ in results:
        torch.testing.assert_close(kl.double(), ref_kl, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[..., :VOCAB].double(), ref_grad, rtol=0, atol=1e-6)
    assert bool((grads[..., VOCAB:] == 0).all())


def test_identical_distributions_have_zero_kl():
    student, _ = _logits()
    kl = vocab_parallel_kl_divergence(student, student.clone(), None, vocab_size=VOCAB)
    assert float(kl.abs().max()) < 1e-12


def test_bad_temperature_is_refused():
    student, teacher = _logits()
    with pytest.raises(ValueError, match="--kd-temperature"):
        vocab_parallel_kl_divergence(student, teacher, None, vocab_size=VOCAB, temperature=0.0)
