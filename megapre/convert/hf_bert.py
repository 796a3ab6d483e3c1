"""The two Hugging Face BERT families: MegatronBert (pre-LN, as megapre's default BERT) and the
original BERT (post-LN: megapre's --post-layernorm), each with the masked-LM head and, for the
*ForPreTraining classes, the next-sentence head (megapre's binary head: pooler + classifier).

Both share everything but the norms: embeddings (word, position, token type), separate
query/key/value projections (fused here into megapre's QKV layout), the MLP, and the heads.
transformers' BERT uses the exact (erf) GELU (hidden_act 'gelu') in the MLP and in the LM head's
transform, so an import sets --erf-gelu (megapre's LM head transform is always erf GELU). Names,
shapes and config keys are transformers' (facts of the format).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch

from megapre.model.config import ConfigError

from . import qkv

Take = Callable[[str], torch.Tensor]
Named = Iterator[tuple[str, torch.Tensor]]

# per-layer (transformers, megapre) names of the linear layers the two families share
_LINEARS = (("attention.output.dense", "attention.proj"), ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"))
# transformers' key -> the unsupported setting it names (checked when the key is truthy)
_REFUSED_KEYS = {"is_decoder": "a BERT decoder (is_decoder)",
                 "add_cross_attention": "cross-attention (add_cross_attention)"}


def _refuse(cond: bool, what: str) -> None:
    if cond:
        raise ConfigError(what)


def _check_config(hf: dict) -> None:
    act = hf.get("hidden_act", "gelu")
    _refuse(act != "gelu", f"config.json: hidden_act {act!r} is not supported (megapre's BERT "
            "uses the exact GELU, hidden_act 'gelu', in the MLP and the LM head)")
    pos = hf.get("position_embedding_type", "absolute")
    _refuse(pos != "absolute", f"config.json: position_embedding_type {pos!r} is not supported "
            "(megapre's BERT has learned absolute positions: 'absolute')")
    types = hf.get("type_vocab_size", 2)
    _refuse(types != 2, f"config.json: type_vocab_size {types} is not supported (megapre's BERT "
            "has 2 token types)")
    _refuse(not hf.get("tie_word_embeddings", True), "config.json: tie_word_embeddings false is "
            "not supported (megapre's BERT ties its masked-LM output to the word embeddings)")
    for key, what in _REFUSED_KEYS.items():
        _refuse(bool(hf.get(key)), f"config.json: {what} is not supported")


@dataclass(frozen=True)
class BertFamily:
    """The mapping both families share; subclasses name their norms: (transformers, megapre)
    names within a layer (`layer_norms`) and outside the layers (`outer_norms`)."""

    binary_head: bool  # *ForPreTraining (NSP head) rather than *ForMaskedLM
    model = "bert"
    name = ""
    prefix = ""  # the transformers class prefix
    post_layernorm = False
    layer_norms: ClassVar[tuple[tuple[str, str], ...]] = ()
    outer_norms: ClassVar[tuple[tuple[str, str], ...]] = ()

    @property
    def architecture(self) -> str:
        return self.prefix + ("ForPreTraining" if self.binary_head else "ForMaskedLM")

    def model_args(self, hf: dict) -> dict:
        _check_config(hf)
        h, pos = hf["hidden_size"], hf.get("max_position_embeddings", 512)
        return {"num_layers": hf["num_hidden_layers"], "hidden_size": h,
                "num_attention_heads": hf["num_attention_heads"],
                "ffn_hidden_size": hf.get("intermediate_size") or 4 * h,
                "seq_length": pos, "max_position_embeddings": pos, "normalization": "LayerNorm",
                "norm_epsilon": hf.get("layer_norm_eps", 1e-12), "erf_gelu": True,
                "post_layernorm": self.post_layernorm,
                "position_embedding_type": "learned_absolute", "disable_bias_linear": False,
                "untie_embeddings_and_output_weights": False,
                "hidden_dropout": hf.get("hidden_dropout_prob", 0.1),
                "attention_dropout": hf.get("attention_probs_dropout_prob", 0.1),
                "init_method_std": hf.get("initializer_range", 0.02),
                "bert_binary_head": self.binary_head}

    def prefixes(self) -> tuple[str, ...]:
        return ("",)

    def import_weights(self, hf: dict, take: Take, untied: bool) -> Named:
        heads, h = hf["num_attention_heads"], hf["hidden_size"]
        d = h // heads
        for a, n in (("word_embeddings", "word"), ("position_embeddings", "position"),
                     ("token_type_embeddings", "tokentype")):
            yield f"embedding.{n}.weight", take(f"bert.embeddings.{a}.weight")
        for i in range(hf["num_hidden_layers"]):
            src, dst = f"bert.encoder.layer.{i}.", f"encoder.layers.{i}."
            for part in ("weight", "bias"):
                yield dst + "attention.qkv." + part, qkv.fuse(
                    *(take(f"{src}attention.self.{p}.{part}") for p in ("query", "key", "value")),
                    heads, d)
            for a, n in (*_LINEARS, *self.layer_norms):
                yield from _pair(take, src + a, dst + n)
        for a, n in self.outer_norms:
            yield from _pair(take, a, n)
        yield from _pair(take, "cls.predictions.transform.dense", "heads.dense")
        yield from _pair(take, "cls.predictions.transform.LayerNorm", "heads.norm")
        yield "heads.bias", take("cls.predictions.bias")
        if self.binary_head:
            yield from _pair(take, "bert.pooler.dense", "heads.pooler")
            yield from _pair(take, "cls.seq_relationship", "heads.binary")

    def hf_config(self, m: dict, vocab_size: int) -> dict:
        _check_exportable(m)
        return {"vocab_size": vocab_size, "hidden_size": m["hidden_size"],
                "num_hidden_layers": m["num_layers"],
                "num_attention_heads": m["num_attention_heads"],
                "intermediate_size": m["ffn_hidden_size"] or 4 * m["hidden_size"],
                "hidden_act": "gelu", "hidden_dropout_prob": m["hidden_dropout"],
                "attention_probs_dropout_prob": m["attention_dropout"],
                "max_position_embeddings": m["max_position_embeddings"] or m["seq_length"],
                "type_vocab_size": 2, "initializer_range": m["init_method_std"],
                "layer_norm_eps": m["norm_epsilon"], "tie_word_embeddings": True}

    def export_weights(self, m: dict, state: dict[str, torch.Tensor]) -> Named:
        heads = m["num_attention_heads"]
        d = m["hidden_size"] // heads
        for a, n in (("word_embeddings", "word"), ("position_embeddings", "position"),
                     ("token_type_embeddings", "tokentype")):
            yield f"bert.embeddings.{a}.weight", state[f"embedding.{n}.weight"]
        for i in range(m["num_layers"]):
            src, dst = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
            for part in ("weight", "bias"):
                q, k, v = qkv.split(state[f"{src}attention.qkv.{part}"], heads, heads, d)
                for p, t in (("query", q), ("key", k), ("value", v)):
                    yield f"{dst}attention.self.{p}.{part}", t
            for a, n in (*_LINEARS, *self.layer_norms):
                yield from _pair(state.__getitem__, src + n, dst + a)
        for a, n in self.outer_norms:
            yield from _pair(state.__getitem__, n, a)
        yield from _pair(state.__getitem__, "heads.dense", "cls.predictions.transform.dense")
        yield from _pair(state.__getitem__, "heads.norm", "cls.predictions.transform.LayerNorm")
        yield "cls.predictions.bias", state["heads.bias"]
        if self.binary_head:
            yield from _pair(state.__getitem__, "heads.pooler", "bert.pooler.dense")
            yield from _pair(state.__getitem__, "heads.binary", "cls.seq_relationship")


def _pair(take: Take, src: str, dst: str) -> Named:
    """A layer's weight and bias under another name."""
    yield f"{dst}.weight", take(f"{src}.weight")
    yield f"{dst}.bias", take(f"{src}.bias")


def _check_exportable(m: dict) -> None:
    _refuse(not m["erf_gelu"], "BERT export needs --erf-gelu (transformers' BERT GELU is the "
            "exact one; megapre's default MLP GELU is the tanh approximation)")
    _refuse(m["position_embedding_type"] != "learned_absolute" or m["normalization"] !=
            "LayerNorm" or m["disable_bias_linear"],
            "BERT export needs learned positions, LayerNorm and biases")
    _refuse(m["group_query_attention"], "BERT has no grouped-query attention")
    _refuse(m["kv_channels"] not in (None, m["hidden_size"] // m["num_attention_heads"]),
            "BERT needs --kv-channels = hidden / heads")
    _refuse(m["apply_layernorm_1p"] or m["qk_layernorm"],
            "BERT has no --apply-layernorm-1p or --qk-layernorm")


@dataclass(frozen=True)
class MegatronBert(BertFamily):
    """MegatronBertForPreTraining / ForMaskedLM: pre-LN (`attention.ln`, `ln`), a final
    `bert.encoder.ln`, no norm after the embeddings."""

    name = "megatron-bert"
    prefix = "MegatronBert"
    layer_norms = (("attention.ln", "norm1"), ("ln", "norm2"))
    outer_norms = (("bert.encoder.ln", "final_norm"),)


@dataclass(frozen=True)
class Bert(BertFamily):
    """BertForPreTraining / ForMaskedLM: post-LN (`attention.output.LayerNorm` after the
    attention residual, `output.LayerNorm` after the MLP's), a norm after the embeddings, no
    final norm."""

    name = "bert"
    prefix = "Bert"
    post_layernorm = True
    layer_norms = (("attention.output.LayerNorm", "norm1"), ("output.LayerNorm", "norm2"))
    outer_norms = (("bert.embeddings.LayerNorm", "embedding.norm"),)


BERTS = (MegatronBert(True), MegatronBert(False), Bert(True), Bert(False))
MODEL_TYPES = ("megatron-bert", "bert")


def bert_of(hf: dict, path: str) -> BertFamily:
    """The family and head of a BERT config.json (by model_type, then architectures)."""
    kinds = [f for f in BERTS if f.name == hf.get("model_type")]
    archs = hf.get("architectures") or [kinds[0].architecture]
    for f in kinds:
        if f.architecture in archs:
            return f
    raise ConfigError(f"{path}: architectures {archs} is not supported for model_type "
                      f"{hf.get('model_type')!r}; megapre converts "
                      f"{', '.join(f.architecture for f in kinds)}")


def bert_for_export(m: dict) -> BertFamily:
    """MegatronBert for pre-LN, Bert for --post-layernorm; NSP head with --bert-binary-head."""
    family = Bert if m["post_layernorm"] else MegatronBert
    return family(bool(m["bert_binary_head"]))
