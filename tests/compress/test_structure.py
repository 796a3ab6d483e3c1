"""Which layers megapre.compress.structure swaps: every linear of the transformer blocks (GPT
and BERT, SwiGLU's gate too), the GPT output layer only with --quantize-lm-head (tied or
untied); everything else stays float; a model is quantized once; the int8 model stays close to
the float one."""
from __future__ import annotations

import pytest
import torch

from megapre.compress import QuantConfig
from megapre.compress.int8_layers import INT8_LAYERS, Int8VocabHead
from megapre.compress.quantize import relative_error
from megapre.compress.structure import block_linears, quantize_model
from megapre.errors import ConfigError
from megapre.model.bert import BertModel
from megapre.model.config import TransformerConfig
from megapre.model.gpt import GPTModel
from megapre.parallel import ParallelMesh

S, B, VOCAB = 12, 2, 61


def _cfg(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                seq_length=S, max_position_embeddings=S, hidden_dropout=0.0,
                attention_dropout=0.0, make_vocab_size_divisible_by=8)
    return TransformerConfig(**{**base, **kw})


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kw", [{}, dict(activation="swiglu", normalization="RMSNorm",
                                         add_bias_linear=False),
                                dict(untie_embeddings_and_output_weights=True),
                                dict(share_layers_every=2, embedding_size=16)])
@pytest.mark.parametrize("head", [False, True])
def test_gpt_layers_swapped(kw, head):
    mesh = ParallelMesh.single(device="cpu")
    model = GPTModel(_cfg(**kw), mesh, seed=3).eval()
    with torch.no_grad():
        want = model.gathered_logits(model(_ids()))
    expected = len(block_linears(model))
    sets = 2 // kw.get("share_layers_every", 1)  # ALBERT sharing: one weight set per K layers
    assert expected == sets * (5 if kw.get("activation") == "swiglu" else 4)
    n = quantize_model(model, QuantConfig("weight-int8", quantize_lm_head=head), mesh)
    assert n == expected + head and not block_linears(model)
    assert sum(isinstance(m, INT8_LAYERS) for m in model.modules()) == expected
    assert isinstance(model.output_quant, Int8VocabHead) == head
    if head:
        assert model.output_layer is None
    assert model.embedding.word.weight.dtype == torch.float32
    with torch.no_grad():
        got = model.gathered_logits(model(_ids()))
    assert relative_error(got, want) < 0.02
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, QuantConfig("w8a8"), mesh)


def test_bert_blocks_quantized_head_refused():
    mesh = ParallelMesh.single(device="cpu")
    model = BertModel(_cfg(), mesh, seed=3).eval()
    types = torch.zeros(B, S, dtype=torch.long)
    pad = torch.zeros(B, S, dtype=torch.bool)
    with torch.no_grad():
        want = model(_ids(), types, pad)[0]
    assert quantize_model(model, QuantConfig("w8a8"), mesh) == 8
    with torch.no_grad():
        got = model(_ids(), types, pad)[0]
    assert relative_error(got, want) < 0.05
    other = BertModel(_cfg(), mesh, seed=3)
    with pytest.raises(ConfigError, match="--quantize-lm-head"):
        quantize_model(other, QuantConfig("weight-int8", quantize_lm_head=True), mesh)
