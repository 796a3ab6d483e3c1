"""LoRA under tensor (and sequence) parallelism equals one process: a tiny GPT with adapters on
every target, B set non-zero (so A's grads are not trivially zero) and LoRA dropout on, gives the
single-process loss, every LoRA grad (summed over TP by sync_sequence_parallel_grads, gathered
to full), the global grad norm, and after merge_lora the same logits and merged weights."""
from __future__ import annotations

import zlib

import pytest
import torch
from torch.testing import assert_close

from megapre.model.config import TransformerConfig
from megapre.model.gpt import GPTModel
from megapre.model.lora import LoRAConfig, apply_lora, lora_parameter_names, merge_lora
from megapre.parallel import (ParallelConfig, ParallelMesh, gather_full_param, load_full_param,
                              sync_sequence_parallel_grads)
from megapre.parallel.grads import global_grad_norm
from megapre.parallel.testing import run_distributed

VOCAB, S, B = 61, 8, 2
TOL = dict(rtol=1e-5, atol=1e-7)
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.2)
MODELS = {
    "gelu": {},  # biases everywhere, fc1 with the fused bias-GELU (skip_bias_add)
    "swiglu": dict(activation="swiglu", normalization="RMSNorm", add_bias_linear=False,
                   num_query_groups=2, position_embedding_type="rope"),
}


def _cfg(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                seq_length=S, max_position_embeddings=S, hidden_dropout=0.0,
                attention_dropout=0.0, make_vocab_size_divisible_by=8)
    base.update(kw)
    return TransformerConfig(**base)


def _full_shape(p: torch.Tensor, mesh: ParallelMesh) -> list[int]:
    shape = list(p.shape)
    dim = getattr(p, "tensor_parallel_dim", None)
    if dim is not None:
        shape[dim] *= mesh.tp_size
    return shape


def _set_b(model: torch.nn.Module, mesh: ParallelMesh) -> None:
    """Non-zero B, the same full tensor in every layout (drawn per name)."""
    for name in lora_parameter_names(model):
        if name.endswith("lora_b"):
            p = model.get_parameter(name)
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            load_full_param(p, torch.randn(_full_shape(p, mesh), generator=g) * 0.1, mesh)


def _full_grad(p: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    g = p.grad.detach()
    g.tensor_parallel_dim = getattr(p, "tensor_parallel_dim", None)
    return gather_full_param(g, mesh)


def _run(cfg_kw: dict, mesh: ParallelMesh) -> dict:
    ids = torch.randint(0, VOCAB, (B, S + 1), generator=torch.Generator().manual_seed(7))
    model = GPTModel(_cfg(**cfg_kw), mesh, seed=11)
    apply_lora(model, LORA, mesh, seed=11)
    _set_b(model, mesh)
    names = lora_parameter_names(model)
    torch.manual_seed(99)  # the LoRA dropout masks come from the default generator
    loss = model(ids[:, :-1], labels=ids[:, 1:])
    loss.mean().backward()
    sync_sequence_parallel_grads(model, mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {"loss": loss.detach(), "norm": global_grad_norm(params, mesh),
           "grads": {n: _full_grad(model.get_parameter(n), mesh) for n in names}}
    model.eval()
    with torch.no_grad():
        out["unmerged"] = model.gathered_logits(model(ids[:, :-1]))
        merge_lora(model)
        out["merged"] = model.gathered_logits(model(ids[:, :-1]))
    out["weights"] = {n: gather_full_param(p, mesh) for n, p in model.named_parameters()}
    return out


def _worker(rank: int, world: int, sp: bool) -> dict:
    mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=world, sequence_parallel=sp),
                             device="cpu")
    try:
        return {kind: _run(kw, mesh) for kind, kw in MODELS.items()}
    finally:
        mesh.destroy()


@pytest.fixture(scope="module")
def reference() -> dict:
    mesh = ParallelMesh.single(device="cpu")
    return {kind: _run(kw, mesh) for kind, kw in MODELS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_lora_under_tensor_parallel_matches_single_process(sp, reference):
    for rank, per_kind in enumerate(run_distributed(_worker, 2, sp)):
        for kind, got in per_kind.items():
            ref = reference[kind]
            where = f"rank {rank}, {kind}"
            assert_close(got["loss"], ref["loss"], **TOL, msg=where)
            assert got["grads"].keys() == ref["grads"].keys()
            for name, grad in ref["grads"].items():
                assert grad.abs().sum() > 0, name
                assert_close(got["grads"][name], grad, **TOL, msg=f"{where}: {name}")
            assert got["norm"] == pytest.approx(ref["norm"], rel=1e-5), where
            assert_close(got["unmerged"], ref["unmerged"], **TOL, msg=where)
            assert_close(got["merged"], got["unmerged"], rtol=1e-5, atol=1e-5, msg=where)
            assert got["weights"].keys() == ref["weights"].keys()
            for name, w in ref["weights"].items():
                assert_close(got["weights"][name], w, rtol=1e-6, atol=1e-7,
                             msg=f"{where}: {name}")
