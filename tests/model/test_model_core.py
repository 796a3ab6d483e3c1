"""Model building blocks that do not need a process group: config validation, the two core
attention backends (they must agree), rotary embeddings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megapre.model.attention_core import CoreAttention
from megapre.model.config import ConfigError, TransformerConfig
from megapre.model.rope import apply_rope, rope_frequencies


def naive_attention(q, k, v, mask, causal):
    """Plain math on [s, b, heads, d] with GQA by explicit repetition."""
    nh = q.shape[2]
    k = k.repeat_interleave(nh // k.shape[2], dim=2)
    v = v.repeat_interleave(nh // v.shape[2], dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    sq, sk = q.shape[0], k.shape[0]
    hide = torch.zeros(1, 1, sq, sk, dtype=torch.bool)
    if causal:
        hide = hide | (torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + (sk - sq))
    if mask is not None:
        hide = hide | mask
    probs = scores.masked_fill(hide, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, v)
    return out.reshape(sq, q.shape[1], -1)


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk,groups", [(5, 5, 4), (3, 7, 2), (17, 17, 1), (1, 9, 2)])
def test_core_attention_matches_math(backend, causal, sq, sk, groups):
    torch.manual_seed(sq * 31 + sk)
    q = torch.randn(sq, 2, 4, 8, requires_grad=True)
    k = torch.randn(sk, 2, groups, 8, requires_grad=True)
    v = torch.randn(sk, 2, groups, 8, requires_grad=True)
    mask = torch.rand(2, 1, sq, sk) < 0.3
    mask[1, 0, 0] = True  # a fully masked query row: zeros, never NaN
    attn = CoreAttention(8, 0.0, backend)
    out = attn(q, k, v, mask, causal=causal)
    ref = naive_attention(q, k, v, mask, causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(out[0, 1] == 0)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_core_attention_dropout_uses_given_rng_context():
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    attn = CoreAttention(8, 0.5, "fused", dropout_rng=Ctx).train()
    q = torch.randn(4, 1, 2, 8)
    attn(q, q, q, None, causal=True)
    assert entered == [True]
    attn.eval()
    out = attn(q, q, q, None, causal=True)
    torch.testing.assert_close(out, naive_attention(q, q, q, None, True), rtol=1e-5, atol=1e-5)
    assert entered == [True]  # no dropout (and no RNG fork) in eval mode


def test_rope_preserves_norm_and_depends_on_relative_position():
    torch.manual_seed(0)
    d = 16
    q = torch.randn(1, 1, 1, d).expand(12, 1, 1, d)
    k = torch.randn(1, 1, 1, d).expand(12, 1, 1, d)
    ang = rope_frequencies(torch.arange(12), d)
    qr, kr = apply_rope(q, ang), apply_rope(k, ang)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    dots = torch.einsum("ibhd,jbhd->ij", qr, kr)
    # <R_i q, R_j k> is a function of i - j only
    torch.testing.assert_close(dots[3, 1], dots[9, 7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dots[0, 5], dots[6, 11], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dots[3, 1], dots[3, 2])


def test_rope_partial_rotation_passes_the_rest_through():
    x = torch.randn(5, 2, 3, 16)
    y = apply_rope(x, rope_frequencies(torch.arange(5), 8))
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert not torch.allclose(y[1:, ..., :8], x[1:, ..., :8])


def test_config_defaults_and_padding():
    cfg = TransformerConfig(hidden_size=256, num_attention_heads=8, vocab_size=50257)
    assert cfg.ffn_hidden_size == 1024 and cfg.num_query_groups == 8 and cfg.head_dim == 32
    assert cfg.padded_vocab_size(1) == 50304 and cfg.padded_vocab_size(4) == 50688
    # Megatron's SwiGLU rule int((4h * 2/3) / 64) * 64, rounded down (the h=512 -> 1344)
    for hidden, ffn in ((512, 1344), (4096, 10880), (768, 2048)):
        swiglu = TransformerConfig(hidden_size=hidden, num_attention_heads=8, activation="swiglu")
        assert swiglu.ffn_hidden_size == ffn
    cfg.validate(tensor_parallel=4, pipeline_parallel=3)


@pytest.mark.parametrize("kwargs,layout,flag", [
    (dict(num_attention_heads=6, hidden_size=96), dict(tensor_parallel=4), "--num-attention-heads 6"),
    (dict(num_attention_heads=3, hidden_size=32), {}, "--hidden-size=32"),
    (dict(num_attention_heads=8, num_query_groups=2), dict(tensor_parallel=4), "--num-query-groups 2"),
    (dict(num_attention_heads=8, num_query_groups=3), {}, "--num-query-groups 3"),
    (dict(num_layers=6), dict(pipeline_parallel=4), "--num-layers 6"),
    (dict(num_layers=8), dict(pipeline_parallel=2, virtual_stages=3), "virtual stages"),
    (dict(seq_length=2048), {}, "--max-position-embeddings"),
    (dict(seq_length=30), dict(tensor_parallel=4, sequence_parallel=True), "--sequence-parallel"),
    (dict(normalization="BatchNorm"), {}, "--normalization"),
    (dict(hidden_dropout=1.5), {}, "--hidden-dropout"),
    (dict(hidden_size=0), {}, "--hidden-size"),
])
def test_config_errors_name_the_flag(kwargs, layout, flag):
    base = dict(num_layers=12, hidden_size=128, num_attention_heads=8, seq_length=128,
                max_position_embeddings=1024)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=flag.replace("-", r"\-").replace("=", "=")):
        TransformerConfig(**base).validate(**layout)


def test_bias_free_block_under_bf16_autocast():
    """A bias-free output projection returns bf16 under autocast while the residual is fp32."""
    from megapre.model.gpt import GPTModel
    from megapre.parallel import ParallelMesh

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=50,
                            seq_length=8, max_position_embeddings=8, add_bias_linear=False,
                            hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(cfg, ParallelMesh.single(device="cpu"))
    ids = torch.randint(0, 50, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids)
    loss.mean().backward()
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_one_name_per_parameter(kind):
    """A parameter's module path is its checkpoint key and seeds its initialization, and a
    pipeline chunk names its layers by global index: the values drawn from the generator named
    by the path reproduce every initialized weight, on the whole model and on a later chunk."""
    from megapre.model.bert import BertModel
    from megapre.model.gpt import GPTModel
    from megapre.model.init import _generator
    from megapre.parallel import ParallelMesh
    from megapre.parallel.pipeline import ChunkSpec

    cfg = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=100,
                            seq_length=8, max_position_embeddings=8,
                            untie_embeddings_and_output_weights=kind == "gpt")
    mesh = ParallelMesh.single(device="cpu")
    cls = GPTModel if kind == "gpt" else BertModel
    whole = dict(cls(cfg, mesh, seed=7).named_parameters())
    drawn = 0
    for name, p in whole.items():
        if p.dim() < 2:
            continue  # biases and norms start at 0 / 1
        rows = min(p.shape[0], cfg.vocab_size)  # vocabulary padding rows stay zero
        unit = torch.empty(p.shape, dtype=torch.float32)[:rows]
        torch.nn.init.normal_(unit, 0.0, 1.0, generator=_generator(7, name))
        std = float(p.detach()[:rows].flatten()[0] / unit.flatten()[0])
        torch.testing.assert_close(p[:rows], unit * std, rtol=1e-5, atol=1e-7, msg=name)
        drawn += 1
    assert drawn >= 2 + 4 * 3
    tail = dict(cls(cfg, mesh, seed=7, stage=ChunkSpec(1, 2, 2, 4)).named_parameters())
    assert any(n.endswith("layers.3.mlp.fc1.weight") for n in tail)
    for name, p in tail.items():
        if name != "output_word.weight":  # the tied copy, saved under embedding.word.weight
            assert torch.equal(p, whole[name]), name


@pytest.mark.parametrize("spec", ["full", "full:uniform:2", "full:uniform:3", "full:block:1",
                                  "full:block:4", "selective"])
def test_recompute_methods_keep_losses_and_grads(spec):
    """Megatron's --recompute-method uniform|block with --recompute-num-layers: the same loss
    and gradients as no recomputation, dropout masks included (the RNG is replayed)."""
    from megapre.model.gpt import GPTModel
    from megapre.parallel import ParallelMesh, set_random_seed

    cfg = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=50,
                            seq_length=8, max_position_embeddings=8, hidden_dropout=0.2,
                            attention_dropout=0.2)
    mesh = ParallelMesh.single(device="cpu")
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))

    def run(recompute):
        tracker = set_random_seed(5, mesh)
        model = GPTModel(cfg, mesh, seed=5, tracker=tracker, recompute_granularity=recompute)
        model.train()
        loss = model(ids, labels=ids).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = run(None)
    loss, grads = run(spec)
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_recompute_spec_is_checked():
    from megapre.model.transformer import parse_recompute

    assert parse_recompute("full:block:2") == ("full", "block", 2)
    for bad in ("full:blocks:2", "full:uniform:0", "partial", "full:uniform"):
        with pytest.raises(ValueError, match="--recompute-method"):
            parse_recompute(bad)


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_zero_centered_gamma_norm_equals_plain_norm(kind):
    """--apply-layernorm-1p: stored weight gamma - 1 gives the plain norm's output with gamma,
    and the same gradient for it."""
    from megapre import ops

    torch.manual_seed(0)
    gamma = torch.randn(16)
    plain, centred = getattr(ops, kind)(16), getattr(ops, kind)(16, zero_centered_gamma=True)
    assert torch.equal(centred.weight, torch.zeros(16))  # init: gamma = 1
    with torch.no_grad():
        plain.weight.copy_(gamma)
        centred.weight.copy_(gamma - 1)
    x = torch.randn(3, 5, 16)
    out_p, out_c = plain(x), centred(x)
    torch.testing.assert_close(out_c, out_p)
    out_p.square().sum().backward()
    out_c.square().sum().backward()
    torch.testing.assert_close(centred.weight.grad, plain.weight.grad)


def test_interleaved_rope_rotates_adjacent_pairs():
    """--rotary-interleaved: channels (2i, 2i+1) rotate as the complex number x_2i + i x_2i+1
    by position * base^(-2i/d) (RoFormer's original layout); the rest of the head passes."""
    torch.manual_seed(0)
    s, d, rot = 5, 8, 6
    x = torch.randn(s, 2, 3, d)
    angles = rope_frequencies(torch.arange(s), rot, 100.0, interleaved=True)
    out = apply_rope(x, angles, interleaved=True)
    theta = torch.arange(s)[:, None].float() * 100.0 ** (-torch.arange(0, rot, 2).float() / rot)
    pairs = torch.view_as_complex(x[..., :rot].reshape(s, 2, 3, rot // 2, 2).contiguous())
    want = torch.view_as_real(pairs * torch.polar(torch.ones_like(theta), theta)[:, None, None])
    torch.testing.assert_close(out[..., :rot], want.reshape(s, 2, 3, rot))
    torch.testing.assert_close(out[..., rot:], x[..., rot:])
