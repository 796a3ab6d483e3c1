"""The Hugging Face model families megapre converts, each as its config and weight-name mapping.

`import_weights` reads a family's tensors through `take(name)` (lazy, from safetensors) and yields
megapre's layout-independent names with vocabulary tables unpadded; `export_weights` is the
inverse over such a state. Names, shapes and conventions are transformers' (facts of the format).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megapre.model.config import ConfigError

from . import qkv
from .hf_bert import MODEL_TYPES as BERT_TYPES, BertFamily, bert_for_export, bert_of

Take = Callable[[str], torch.Tensor]
Named = Iterator[tuple[str, torch.Tensor]]


def _refuse(cond: bool, what: str) -> None:
    if cond:
        raise ConfigError(what)


def _rope_theta(hf: dict) -> float:
    """rope_theta from either spelling (transformers 5's rope_parameters or the older keys);
    scaled RoPE variants are refused by name."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    _refuse(kind != "default", f"config.json: rope type {kind!r} (RoPE scaling) is not supported; "
            "megapre's RoPE is the unscaled one (rope_type 'default')")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


@dataclass(frozen=True)
class GPT2:
    """GPT2LMHeadModel: LayerNorm, learned positions, biases, tanh-GELU MLP, fused c_attn
    (Conv1D: weights stored [in, out])."""

    name = "gpt2"
    architecture = "GPT2LMHeadModel"
    model = "gpt"

    def model_args(self, hf: dict) -> dict:
        act = hf.get("activation_function", "gelu_new")
        _refuse(act not in ("gelu_new", "gelu_pytorch_tanh"),
                f"config.json: activation_function {act!r} is not supported (megapre's GELU is "
                "the tanh approximation: gelu_new / gelu_pytorch_tanh)")
        _refuse(hf.get("scale_attn_by_inverse_layer_idx", False) or
                not hf.get("scale_attn_weights", True),
                "config.json: GPT-2 attention scaling other than 1/sqrt(head_dim) "
                "(scale_attn_by_inverse_layer_idx / scale_attn_weights) is not supported")
        _refuse(bool(hf.get("add_cross_attention")), "config.json: cross-attention is not "
                "supported (a decoder-only GPT-2 is)")
        h = hf["n_embd"]
        return {"num_layers": hf["n_layer"], "hidden_size": h,
                "num_attention_heads": hf["n_head"], "ffn_hidden_size": hf.get("n_inner") or 4 * h,
                "seq_length": hf["n_positions"], "max_position_embeddings": hf["n_positions"],
                "normalization": "LayerNorm", "norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
                "position_embedding_type": "learned_absolute", "disable_bias_linear": False,
                "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", True),
                "hidden_dropout": hf.get("resid_pdrop", 0.1),
                "attention_dropout": hf.get("attn_pdrop", 0.1),
                "init_method_std": hf.get("initializer_range", 0.02)}

    def prefixes(self) -> tuple[str, ...]:
        return ("transformer.", "")

    def import_weights(self, hf: dict, take: Take, untied: bool) -> Named:
        heads, h = hf["n_head"], hf["n_embd"]
        d = h // heads
        yield "embedding.word.weight", take("wte.weight")
        yield "embedding.position.weight", take("wpe.weight")
        for i in range(hf["n_layer"]):
            src, dst = f"h.{i}.", f"decoder.layers.{i}."
            w = take(src + "attn.c_attn.weight").t()
            b = take(src + "attn.c_attn.bias")
            yield dst + "attention.qkv.weight", qkv.fuse(*w.split(h), heads, d)
            yield dst + "attention.qkv.bias", qkv.fuse(*b.split(h), heads, d)
            for a, m in (("ln_1", "norm1"), ("ln_2", "norm2")):
                yield dst + m + ".weight", take(f"{src}{a}.weight")
                yield dst + m + ".bias", take(f"{src}{a}.bias")
            for a, m in (("attn.c_proj", "attention.proj"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2")):
                yield dst + m + ".weight", take(f"{src}{a}.weight").t()  # copied once, on load
                yield dst + m + ".bias", take(f"{src}{a}.bias")
        yield "final_norm.weight", take("ln_f.weight")
        yield "final_norm.bias", take("ln_f.bias")
        if untied:
            yield "output_layer.weight", take("@lm_head.weight")

    def hf_config(self, m: dict, vocab_size: int) -> dict:
        _refuse(m["position_embedding_type"] != "learned_absolute" or m["normalization"] !=
                "LayerNorm" or m["swiglu"] or m["squared_relu"] or m["disable_bias_linear"],
                "GPT-2 export needs learned positions, LayerNorm, biases and a GELU MLP")
        _refuse(m["group_query_attention"], "GPT-2 has no grouped-query attention")
        _refuse(m["kv_channels"] not in (None, m["hidden_size"] // m["num_attention_heads"]),
                "GPT-2 needs --kv-channels = hidden / heads")
        _refuse(m["apply_layernorm_1p"] or m["qk_layernorm"] or m["post_layernorm"] or
                m["erf_gelu"], "GPT-2 has no --apply-layernorm-1p, --qk-layernorm, "
                "--post-layernorm or --erf-gelu")
        h = m["hidden_size"]
        return {"vocab_size": vocab_size, "n_positions": m["max_position_embeddings"] or
                m["seq_length"], "n_embd": h, "n_layer": m["num_layers"],
                "n_head": m["num_attention_heads"], "n_inner": m["ffn_hidden_size"] or 4 * h,
                "activation_function": "gelu_new", "layer_norm_epsilon": m["norm_epsilon"],
                "resid_pdrop": m["hidden_dropout"], "embd_pdrop": m["hidden_dropout"],
                "attn_pdrop": m["attention_dropout"], "initializer_range": m["init_method_std"],
                "tie_word_embeddings": not m["untie_embeddings_and_output_weights"]}

    def export_weights(self, m: dict, state: dict[str, torch.Tensor]) -> Named:
        heads, h = m["num_attention_heads"], m["hidden_size"]
        d = h // heads
        yield "transformer.wte.weight", state["embedding.word.weight"]
        yield "transformer.wpe.weight", state["embedding.position.weight"]
        for i in range(m["num_layers"]):
            src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
            q, k, v = qkv.split(state[src + "attention.qkv.weight"], heads, heads, d)
            yield dst + "attn.c_attn.weight", torch.cat([q, k, v]).t().contiguous()
            yield dst + "attn.c_attn.bias", torch.cat(qkv.split(
                state[src + "attention.qkv.bias"], heads, heads, d))
            for a, n in (("ln_1", "norm1"), ("ln_2", "norm2")):
                yield f"{dst}{a}.weight", state[src + n + ".weight"]
                yield f"{dst}{a}.bias", state[src + n + ".bias"]
            for a, n in (("attn.c_proj", "attention.proj"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2")):
                yield f"{dst}{a}.weight", state[src + n + ".weight"].t().contiguous()
                yield f"{dst}{a}.bias", state[src + n + ".bias"]
        yield "transformer.ln_f.weight", state["final_norm.weight"]
        yield "transformer.ln_f.bias", state["final_norm.bias"]
        if m["untie_embeddings_and_output_weights"]:
            yield "lm_head.weight", state["output_layer.weight"]


@dataclass(frozen=True)
class Llama:
    """LlamaForCausalLM: RMSNorm, RoPE (rotate-half), SwiGLU, grouped-query attention, no
    biases, untied or tied embeddings."""

    name = "llama"
    architecture = "LlamaForCausalLM"
    model = "gpt"

    def model_args(self, hf: dict) -> dict:
        act = hf.get("hidden_act", "silu")
        _refuse(act != "silu", f"config.json: hidden_act {act!r} is not supported (SwiGLU "
                "uses silu)")
        _refuse(bool(hf.get("attention_bias")) or bool(hf.get("mlp_bias")),
                "config.json: attention_bias / mlp_bias are not supported for Llama")
        h, heads = hf["hidden_size"], hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or heads
        d = hf.get("head_dim") or h // heads
        pos = hf.get("max_position_embeddings", 2048)
        return {"num_layers": hf["num_hidden_layers"], "hidden_size": h,
                "num_attention_heads": heads, "group_query_attention": kv != heads,
                "num_query_groups": kv if kv != heads else None,
                "ffn_hidden_size": hf["intermediate_size"],
                "kv_channels": d if d != h // heads else None, "seq_length": pos,
                "max_position_embeddings": pos, "normalization": "RMSNorm",
                "norm_epsilon": hf.get("rms_norm_eps", 1e-6), "swiglu": True,
                "position_embedding_type": "rope", "rotary_base": _rope_theta(hf),
                "disable_bias_linear": True,
                "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
                "hidden_dropout": 0.0, "attention_dropout": hf.get("attention_dropout", 0.0),
                "init_method_std": hf.get("initializer_range", 0.02)}

    def prefixes(self) -> tuple[str, ...]:
        return ("model.", "")

    def import_weights(self, hf: dict, take: Take, untied: bool) -> Named:
        args = self.model_args(hf)
        heads = args["num_attention_heads"]
        groups = args["num_query_groups"] or heads
        d = args["kv_channels"] or args["hidden_size"] // heads
        yield "embedding.word.weight", take("embed_tokens.weight")
        for i in range(args["num_layers"]):
            src, dst = f"layers.{i}.", f"decoder.layers.{i}."
            yield dst + "attention.qkv.weight", qkv.fuse(
                take(src + "self_attn.q_proj.weight"), take(src + "self_attn.k_proj.weight"),
                take(src + "self_attn.v_proj.weight"), groups, d)
            for a, n in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2"),
                         ("self_attn.o_proj", "attention.proj"), ("mlp.up_proj", "mlp.fc1"),
                         ("mlp.gate_proj", "mlp.gate"), ("mlp.down_proj", "mlp.fc2")):
                yield f"{dst}{n}.weight", take(f"{src}{a}.weight")
        yield "final_norm.weight", take("norm.weight")
        if untied:
            yield "output_layer.weight", take("@lm_head.weight")

    def hf_config(self, m: dict, vocab_size: int) -> dict:
        _refuse(m["position_embedding_type"] != "rope" or m["normalization"] != "RMSNorm" or
                not m["swiglu"] or not m["disable_bias_linear"],
                "Llama export needs RoPE, RMSNorm, SwiGLU and --disable-bias-linear")
        _refuse(m["rotary_percent"] != 1.0 or m["rotary_interleaved"],
                "Llama's RoPE rotates every channel by halves: --rotary-percent 1 without "
                "--rotary-interleaved")
        _refuse(m["apply_layernorm_1p"] or m["qk_layernorm"] or m["post_layernorm"],
                "Llama has no --apply-layernorm-1p, --qk-layernorm or --post-layernorm")
        heads = m["num_attention_heads"]
        h = m["hidden_size"]
        return {"vocab_size": vocab_size, "hidden_size": h,
                "intermediate_size": m["ffn_hidden_size"], "num_hidden_layers": m["num_layers"],
                "num_attention_heads": heads,
                "num_key_value_heads": (m["num_query_groups"] or heads)
                if m["group_query_attention"] else heads,
                "head_dim": m["kv_channels"] or h // heads, "hidden_act": "silu",
                "max_position_embeddings": m["max_position_embeddings"] or m["seq_length"],
                "rms_norm_eps": m["norm_epsilon"], "rope_theta": m["rotary_base"],
                "attention_bias": False, "mlp_bias": False,
                "attention_dropout": m["attention_dropout"],
                "initializer_range": m["init_method_std"],
                "tie_word_embeddings": not m["untie_embeddings_and_output_weights"]}

    def export_weights(self, m: dict, state: dict[str, torch.Tensor]) -> Named:
        heads, h = m["num_attention_heads"], m["hidden_size"]
        groups = (m["num_query_groups"] or heads) if m["group_query_attention"] else heads
        d = m["kv_channels"] or h // heads
        yield "model.embed_tokens.weight", state["embedding.word.weight"]
        for i in range(m["num_layers"]):
            src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
            q, k, v = qkv.split(state[src + "attention.qkv.weight"], heads, groups, d)
            yield dst + "self_attn.q_proj.weight", q
            yield dst + "self_attn.k_proj.weight", k
            yield dst + "self_attn.v_proj.weight", v
            for a, n in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2"),
                         ("self_attn.o_proj", "attention.proj"), ("mlp.up_proj", "mlp.fc1"),
                         ("mlp.gate_proj", "mlp.gate"), ("mlp.down_proj", "mlp.fc2")):
                yield f"{dst}{a}.weight", state[f"{src}{n}.weight"]
        yield "model.norm.weight", state["final_norm.weight"]
        if m["untie_embeddings_and_output_weights"]:
            yield "lm_head.weight", state["output_layer.weight"]


Family = GPT2 | Llama | BertFamily
FAMILIES = {"gpt2": GPT2(), "llama": Llama()}
SUPPORTED = ("GPT2LMHeadModel (model_type gpt2), LlamaForCausalLM (model_type llama), "
             "MegatronBertForPreTraining / ForMaskedLM (model_type megatron-bert), "
             "BertForPreTraining / ForMaskedLM (model_type bert)")


def family_of(hf: dict, path: str) -> Family:
    """The family of a config.json; unsupported architectures are named with the supported."""
    kind = hf.get("model_type")
    if kind in FAMILIES:
        return FAMILIES[kind]
    if kind in BERT_TYPES:
        return bert_of(hf, path)
    arch = ", ".join(hf.get("architectures") or []) or "no architectures"
    raise ConfigError(f"{path}: model_type {kind!r} ({arch}) is not supported; megapre converts "
                      f"{SUPPORTED}")


def family_for_export(m: dict) -> Family:
    """GPT-2 for learned positions + LayerNorm, Llama for RoPE + RMSNorm + SwiGLU; BERT as
    MegatronBert (pre-LN) or Bert (--post-layernorm)."""
    _refuse(m["share_layers_every"] != 1 or m["embedding_size"] is not None,
            "hf-export: GPT-2, Llama and BERT have no --share-layers-every or --embedding-size "
            "(ALBERT's sharing); export this model with megapre-convert onnx")
    if m["model"] == "bert":
        return bert_for_export(m)
    if m["position_embedding_type"] == "learned_absolute":
        return FAMILIES["gpt2"]
    if m["position_embedding_type"] == "rope":
        return FAMILIES["llama"]
    raise ConfigError(f"hf-export: position embeddings {m['position_embedding_type']!r} match "
                      "no supported family (GPT-2: learned_absolute, Llama: rope)")
