"""GPT and BERT under tensor (and sequence) parallelism equal the single-process model: same
initial weights, per-token losses and gathered gradients (fp32, dropout off)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from megapre.model.bert import BertModel
from megapre.model.config import TransformerConfig
from megapre.model.gpt import GPTModel
from megapre.parallel import (ParallelConfig, ParallelMesh, full_state_dict,
                              sync_sequence_parallel_grads)
from megapre.parallel.layers import gather_full_param
from megapre.parallel.testing import run_distributed

VOCAB, S, B = 61, 8, 2
TOL = dict(rtol=1e-5, atol=1e-6)


def _cfg(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                seq_length=S, max_position_embeddings=S, hidden_dropout=0.0,
                attention_dropout=0.0, make_vocab_size_divisible_by=8)
    base.update(kw)
    return TransformerConfig(**base)


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (B, S + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _predicted() -> torch.Tensor:
    """Masked-LM positions [B, S]: a few per sample, none on sample 1's padding."""
    where = torch.zeros(B, S, dtype=torch.bool)
    where[0, [0, 3, 7]] = True
    where[1, [2, 4]] = True
    return where


def _bert_forward(model: BertModel, ids, labels, predicted: torch.Tensor | None):
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 5:] = True
    types = (torch.arange(S) >= S // 2).long().expand(B, S)
    return model(ids, types, pad, labels, predicted=predicted)


def _run(kind: str, cfg_kw: dict, mesh: ParallelMesh):
    cfg = _cfg(**cfg_kw)
    ids, labels = _batch()
    if kind == "gpt":
        model = GPTModel(cfg, mesh, seed=11)
        loss = model(ids, labels=labels)
        extra = torch.zeros(())
    else:
        model = BertModel(cfg, mesh, seed=11)
        predicted = _predicted() if kind == "bert-predicted" else None
        loss, binary = _bert_forward(model, ids, labels, predicted)
        extra = binary.float().square().sum()
    (loss.mean() + extra).backward()
    sync_sequence_parallel_grads(model, mesh)
    weights = full_state_dict(model, mesh)
    grads = {n: _full_grad(p, mesh) for n, p in model.named_parameters()}
    return loss.detach(), extra.detach(), weights, grads


def _full_grad(p: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    g = p.grad.detach()
    g.tensor_parallel_dim = getattr(p, "tensor_parallel_dim", None)
    return gather_full_param(g, mesh)


def _worker(rank: int, world: int, kind: str, cfg_kw: dict, sp: bool):
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=world, sequence_parallel=sp),
                             device="cpu")
    try:
        return _run(kind, cfg_kw, mesh)
    finally:
        mesh.destroy()


CASES = [
    ("gpt", {}),
    ("gpt", dict(num_query_groups=2, position_embedding_type="rope", activation="swiglu",
                 normalization="RMSNorm", add_bias_linear=False)),
    ("gpt", dict(untie_embeddings_and_output_weights=True, attention_backend="sdpa")),
    ("bert", {}),
    ("bert-predicted", {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,cfg_kw", CASES)
@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_matches_single_process(kind, cfg_kw, sp):
    ref_loss, ref_extra, ref_w, ref_g = _run(kind, cfg_kw, ParallelMesh.single(device="cpu"))
    results = run_distributed(_worker, 2, kind, cfg_kw, sp)
    for loss, extra, weights, grads in results:
        assert_close(loss, ref_loss, **TOL)
        assert_close(extra, ref_extra, **TOL)
        assert weights.keys() == ref_w.keys()
        for name in ref_w:
            assert_close(weights[name], ref_w[name], rtol=0, atol=0, msg=name)
            assert_close(grads[name], ref_g[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bert_predicted_positions_equal_the_full_head():
    """The LM head computed at the masked positions only gives the full head's loss there, 0
    elsewhere, and the same gradients for the masked loss."""
    ids, labels = _batch()
    where = _predicted()
    results = []
    for predicted in (None, where):
        model = BertModel(_cfg(), ParallelMesh.single(device="cpu"), seed=11)
        loss, binary = _bert_forward(model, ids, labels, predicted)
        ((loss * where).sum() + binary.square().sum()).backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (full, full_g), (part, part_g) = results
    assert_close(part, full * where, **TOL)
    assert (part[~where] == 0).all()
    for name, g in full_g.items():
        assert_close(part_g[name], g, rtol=1e-5, atol=1e-7, msg=name)
