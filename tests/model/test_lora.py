"""LoRA on the tensor-parallel layers, one process: the math, init, freezing, merging, names,
dropout and config errors (the TP/SP equivalence is tests/parallel/test_lora_tp.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from megapre.errors import ConfigError
from megapre.model.config import TransformerConfig
from megapre.model.gpt import GPTModel
from megapre.model.lora import (LoRAColumnParallelLinear, LoRAConfig, LoRARowParallelLinear,
                                apply_lora, lora_parameter_names, merge_lora, trainable_fraction)
from megapre.parallel import ColumnParallelLinear, ParallelMesh, RowParallelLinear
from megapre.parallel.pipeline import ChunkSpec

VOCAB, S, B = 61, 8, 2
MESH = ParallelMesh.single(device="cpu")


def _cfg(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                seq_length=S, max_position_embeddings=S, hidden_dropout=0.0,
                attention_dropout=0.0, make_vocab_size_divisible_by=8)
    base.update(kw)
    return TransformerConfig(**base)


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (B, S + 1), generator=torch.Generator().manual_seed(3))
    return ids[:, :-1], ids[:, 1:]


def _randomize_b(model: torch.nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in lora_parameter_names(model):
            if name.endswith("lora_b"):
                p = model.get_parameter(name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _layer_pair(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "column":
        base = ColumnParallelLinear(12, 10, MESH, **kw)
    else:
        base = RowParallelLinear(12, 10, MESH, **kw)
    with torch.no_grad():
        if base.bias is not None:
            base.bias.normal_()
    wrap = LoRAColumnParallelLinear if kind == "column" else LoRARowParallelLinear
    return base, wrap


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_computes_base_plus_scaled_low_rank_update(kind, bias):
    base, wrap = _layer_pair(kind, bias=bias)
    x = torch.randn(S, B, 12)
    before = base(x)
    cfg = LoRAConfig(rank=3, alpha=6.0)
    layer = wrap.from_base(base, cfg, MESH, seed=1, name="l")
    assert layer.weight is base.weight and layer.bias is base.bias
    assert torch.equal(layer(x), before)  # B = 0 at init: exactly the base output
    with torch.no_grad():
        layer.lora_b.normal_()
    expect = x @ base.weight.T + 2.0 * (x @ layer.lora_a.T) @ layer.lora_b.T
    if bias:
        expect = expect + base.bias
    assert_close(layer(x), expect, rtol=1e-5, atol=1e-5)


def test_skip_bias_add_contract_is_kept():
    base, wrap = _layer_pair("column", bias=True, skip_bias_add=True)
    layer = wrap.from_base(base, LoRAConfig(rank=2, alpha=2.0), MESH, seed=1, name="fc1")
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(S, B, 12)
    assert layer.skip_bias_add
    assert_close(layer(x), x @ base.weight.T + (x @ layer.lora_a.T) @ layer.lora_b.T,
                 rtol=1e-5, atol=1e-5)  # the bias is left to the caller (fused bias-GELU)


def test_factor_shapes_init_and_tp_attributes():
    base, wrap = _layer_pair("column")
    col = wrap.from_base(base, LoRAConfig(rank=4, alpha=1.0), MESH, seed=1, name="c")
    rbase, rwrap = _layer_pair("row")
    row = rwrap.from_base(rbase, LoRAConfig(rank=4, alpha=1.0), MESH, seed=1, name="r")
    for layer in (col, row):
        assert layer.lora_a.shape == (4, 12) and layer.lora_b.shape == (10, 4)
        assert not layer.lora_b.any()
        bound = 1 / math.sqrt(12)  # kaiming-uniform with a = sqrt(5)
        assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > bound / 2
    assert getattr(col.lora_a, "tp_partial_grad", False)
    assert getattr(col.lora_a, "tensor_parallel_dim", None) is None
    assert col.lora_b.tensor_parallel_dim == 0
    assert not getattr(col.lora_b, "tp_partial_grad", False)
    assert row.lora_a.tensor_parallel_dim == 1
    assert getattr(row.lora_b, "tp_partial_grad", False)
    assert getattr(row.lora_b, "tensor_parallel_dim", None) is None
    again = wrap.from_base(_layer_pair("column")[0], LoRAConfig(rank=4, alpha=1.0), MESH,
                           seed=1, name="c")
    other = wrap.from_base(_layer_pair("column")[0], LoRAConfig(rank=4, alpha=1.0), MESH,
                           seed=1, name="d")
    assert torch.equal(again.lora_a, col.lora_a)  # drawn from (seed, name)
    assert not torch.equal(other.lora_a, col.lora_a)


def test_apply_keeps_names_output_and_freezes_base():
    model = GPTModel(_cfg(), MESH, seed=11)
    ids, labels = _ids()
    before = model(ids, labels=labels)
    base_names = [n for n, _ in model.named_parameters()]
    replaced = apply_lora(model, LoRAConfig(rank=2, alpha=4.0), MESH, seed=11)
    assert replaced == [f"decoder.layers.{i}.{p}" for i in range(2)
                        for p in ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2")]
    lora = lora_parameter_names(model)
    assert lora == [f"{n}.{f}" for n in replaced for f in ("lora_a", "lora_b")]
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if n not in lora] == base_names  # base names unchanged
    assert_close(model(ids, labels=labels), before, rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)
    mlp = model.decoder.layers["0"].mlp
    assert mlp.fused_gelu and mlp.fc1.skip_bias_add  # the fused bias-GELU path is kept
    _randomize_b(model)
    model(ids, labels=labels).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in lora), n
    trainable, total = trainable_fraction(model)
    assert trainable == sum(model.get_parameter(n).numel() for n in lora)
    assert total == sum(p.numel() for p in model.parameters())


def test_apply_twice_and_missing_targets_are_refused():
    model = GPTModel(_cfg(), MESH, seed=11)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0), MESH, seed=11)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2, alpha=4.0), MESH, seed=11)
    with pytest.raises(ConfigError, match="--lora-targets"):
        apply_lora(torch.nn.Linear(3, 3), LoRAConfig(rank=2, alpha=4.0), MESH, seed=11)


def test_swiglu_gate_is_adapted_with_fc1():
    model = GPTModel(_cfg(activation="swiglu", normalization="RMSNorm", add_bias_linear=False),
                     MESH, seed=11)
    replaced = apply_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("fc1",)), MESH, seed=11)
    assert replaced == ["decoder.layers.0.mlp.fc1", "decoder.layers.0.mlp.gate",
                        "decoder.layers.1.mlp.fc1", "decoder.layers.1.mlp.gate"]
    mlp = model.decoder.layers["1"].mlp
    assert isinstance(mlp.gate, LoRAColumnParallelLinear)
    assert isinstance(mlp.fc2, RowParallelLinear) and not isinstance(mlp.fc2, LoRARowParallelLinear)
    _randomize_b(model)
    ids, labels = _ids()
    model(ids, labels=labels).mean().backward()
    assert mlp.gate.lora_a.grad.abs().sum() > 0 and mlp.fc1.lora_a.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg_kw", [{}, dict(activation="swiglu", add_bias_linear=False)])
def test_merge_equals_unmerged(cfg_kw):
    model = GPTModel(_cfg(**cfg_kw), MESH, seed=11)
    names = [n for n, _ in model.named_parameters()]
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.3), MESH, seed=11)
    _randomize_b(model)
    model.eval()
    ids, labels = _ids()
    with torch.no_grad():
        unmerged = model(ids, labels=labels)
        count = merge_lora(model)
        merged = model(ids, labels=labels)
    assert count == len(model.decoder.layers) * 4 + (2 if cfg_kw else 0)
    assert [n for n, _ in model.named_parameters()] == names
    assert not any(isinstance(m, (LoRAColumnParallelLinear, LoRARowParallelLinear))
                   for m in model.modules())
    assert not any(hasattr(m, "lora_rank") for m in model.modules())
    assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    apply_lora(model, LoRAConfig(rank=2, alpha=2.0), MESH, seed=3)  # a merged model takes LoRA


def test_stage_factors_equal_the_whole_model_factors():
    """A pipeline stage holding layer 1 draws layer 1's factors exactly as the whole model."""
    cfg, lora = _cfg(), LoRAConfig(rank=2, alpha=2.0)
    whole = GPTModel(cfg, MESH, seed=11)
    apply_lora(whole, lora, MESH, seed=11)
    stage = GPTModel(cfg, MESH, seed=11, stage=ChunkSpec(1, 2, 1, 2))
    assert apply_lora(stage, lora, MESH, seed=11) == [
        f"decoder.layers.1.{p}" for p in ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2")]
    for name in lora_parameter_names(stage):
        assert torch.equal(stage.get_parameter(name), whole.get_parameter(name)), name


def test_dropout_only_in_training_and_only_on_the_update():
    model = GPTModel(_cfg(), MESH, seed=11)
    ids, labels = _ids()
    base = model(ids, labels=labels)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.5), MESH, seed=11)
    torch.manual_seed(0)
    assert_close(model(ids, labels=labels), base, rtol=0, atol=0)  # B = 0: nothing to drop
    _randomize_b(model)
    model.eval()
    off = model(ids, labels=labels)
    assert_close(model(ids, labels=labels), off, rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    on1 = model(ids, labels=labels)
    torch.manual_seed(0)
    on2 = model(ids, labels=labels)
    torch.manual_seed(1)
    on3 = model(ids, labels=labels)
    assert torch.equal(on1, on2) and not torch.allclose(on1, off) and not torch.allclose(on1, on3)


@pytest.mark.parametrize("kw,flag", [
    (dict(rank=0, alpha=1.0), "--lora-rank"),
    (dict(rank=2.0, alpha=1.0), "--lora-rank"),
    (dict(rank=2, alpha=0.0), "--lora-alpha"),
    (dict(rank=2, alpha=float("nan")), "--lora-alpha"),
    (dict(rank=2, alpha=1.0, dropout=1.0), "--lora-dropout"),
    (dict(rank=2, alpha=1.0, dropout=-0.1), "--lora-dropout"),
    (dict(rank=2, alpha=1.0, targets=()), "--lora-targets"),
    (dict(rank=2, alpha=1.0, targets="qkv"), "--lora-targets"),
    (dict(rank=2, alpha=1.0, targets=("qkv", "qkv")), "--lora-targets"),
])
def test_validate_names_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        LoRAConfig(**kw).validate()


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'ffn'.*qkv, proj, fc1, fc2"):
        LoRAConfig(rank=2, alpha=1.0, targets=("qkv", "ffn")).validate()


def test_config_round_trip():
    cfg = LoRAConfig(rank=8, alpha=16.0, dropout=0.1, targets=("qkv", "fc2"))
    assert cfg.scaling == 2.0
    d = cfg.to_dict()
    assert d == {"rank": 8, "alpha": 16.0, "dropout": 0.1, "targets": ["qkv", "fc2"]}
    assert LoRAConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="unknown keys.*'r'"):
        LoRAConfig.from_dict({"rank": 8, "alpha": 1.0, "r": 3})
    with pytest.raises(ConfigError, match="missing.*'alpha'"):
        LoRAConfig.from_dict({"rank": 8})
    with pytest.raises(ConfigError, match="--lora-rank"):
        LoRAConfig.from_dict({"rank": -1, "alpha": 1.0})
