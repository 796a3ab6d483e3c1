"""The one description of a transformer that GPT and BERT share.

Field names follow Megatron's flags (``--num-layers`` -> ``num_layers``) so a config file or a
command line written for Megatron maps one to one. ``validate`` is the single place that checks a
model against itself and against a parallel layout; every message names the flag and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

NORMS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")
POSITIONS = ("learned_absolute", "rope", "none")
ATTENTION_BACKENDS = ("auto", "fused", "sdpa")


class ConfigError(ValueError):
    """A model or layout setting that cannot work; the message names the flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TransformerConfig:
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_query_groups: int | None = None  # GQA: key/value heads; None = num_attention_heads
    ffn_hidden_size: int | None = None  # None = 4 * hidden (gelu) or Megatron's 8/3 rule (swiglu)
    kv_channels: int | None = None  # per-head dim; None = hidden_size // num_attention_heads
    vocab_size: int = 50257  # true vocabulary; the embedding is padded, see padded_vocab_size
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 1024
    seq_length: int = 1024
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    add_bias_linear: bool = True
    add_qkv_bias: bool | None = None  # None = add_bias_linear
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_backend: str = "auto"  # see attention_core.resolve_backend; or "fused" / "sdpa"
    bias_activation_fusion: bool = True  # GELU MLP: fc1's bias added inside the fused GELU kernel
    init_method_std: float = 0.02
    apply_query_key_layer_scaling: bool = False
    attention_softmax_in_fp32: bool = True
    extra: dict = field(default_factory=dict)  # model-specific options (e.g. BERT's binary head)

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        self._derived_kv_channels = self.kv_channels is None
        if self.kv_channels is None and self.num_attention_heads > 0:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = self.default_ffn_hidden_size()
        if self.add_qkv_bias is None:
            self.add_qkv_bias = self.add_bias_linear

    def default_ffn_hidden_size(self) -> int:
        """4h for GELU; for SwiGLU 8h/3 rounded up to a multiple of 256 (keeps the parameter count
        of the 4h GELU MLP; LLaMA's rule: 4096 -> 11008)."""
        if self.activation == "swiglu":
            return int(math.ceil(8 * self.hidden_size / 3 / 256) * 256)
        return 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return int(self.kv_channels)

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by * tp (Megatron's
        rule), so every TP rank holds an equal slice. The padded rows never win: the loss and
        generation mask them."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 virtual_stages: int | None = None, sequence_parallel: bool = False) -> None:
        """Raise ConfigError naming the flag when the model or its layout cannot work."""
        _positive(self, ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                         "ffn_hidden_size", "kv_channels", "vocab_size", "seq_length",
                         "max_position_embeddings", "make_vocab_size_divisible_by"))
        if getattr(self, "_derived_kv_channels", False) and \
                self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size={self.hidden_size} is not divisible by --num-attention-heads="
                f"{self.num_attention_heads}; change one of them or give --kv-channels explicitly")
        _choice(self, "normalization", NORMS)
        _choice(self, "activation", ACTIVATIONS)
        _choice(self, "position_embedding_type", POSITIONS)
        _choice(self, "attention_backend", ATTENTION_BACKENDS)
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(name)}={getattr(self, name)} must be in [0, 1)")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"--num-attention-heads={self.num_attention_heads} must be a multiple of "
                f"--num-query-groups={self.num_query_groups} (each key/value head serves an equal "
                "group of query heads)")
        if self.position_embedding_type == "learned_absolute" and \
                self.seq_length > self.max_position_embeddings:
            raise ConfigError(
                f"--seq-length={self.seq_length} exceeds --max-position-embeddings="
                f"{self.max_position_embeddings}; raise --max-position-embeddings or shorten the "
                "sequences")
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head dim, got --kv-channels="
                              f"{self.head_dim}")
        validate_layout(self, tensor_parallel, pipeline_parallel, virtual_stages,
                        sequence_parallel)


def validate_layout(cfg: TransformerConfig, tp: int, pp: int, vp: int | None,
                    sequence_parallel: bool) -> None:
    """Divisibility rules of Megatron-style TP/PP for this model."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tensor-model-parallel-size={tp} and --pipeline-model-parallel-size="
                          f"{pp} must be >= 1")
    if cfg.num_attention_heads % tp:
        raise ConfigError(
            f"--num-attention-heads={cfg.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size={tp}; pick a TP size that divides the head count")
    if cfg.num_query_groups % tp:
        raise ConfigError(
            f"--num-query-groups={cfg.num_query_groups} is not divisible by "
            f"--tensor-model-parallel-size={tp}; each TP rank needs whole key/value heads")
    if cfg.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size={cfg.ffn_hidden_size} is not divisible by "
                          f"--tensor-model-parallel-size={tp}")
    stages = pp * (vp or 1)
    if cfg.num_layers % stages:
        what = f"--pipeline-model-parallel-size={pp}" + (
            f" x {vp} virtual stages" if vp else "")
        raise ConfigError(f"--num-layers={cfg.num_layers} is not divisible by {what}; every "
                          "pipeline stage needs the same number of layers")
    if vp is not None and vp > 1 and pp < 2:
        raise ConfigError("virtual pipeline stages (--num-layers-per-virtual-pipeline-stage) need "
                          "--pipeline-model-parallel-size >= 2")
    if sequence_parallel and cfg.seq_length % tp:
        raise ConfigError(f"--sequence-parallel needs --seq-length={cfg.seq_length} divisible by "
                          f"--tensor-model-parallel-size={tp}")


def _positive(cfg: TransformerConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{_flag(name)}={value!r} must be a positive integer")


def _choice(cfg: TransformerConfig, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"{_flag(name)}={getattr(cfg, name)!r} is not one of {', '.join(allowed)}")


def config_fields() -> list[str]:
    return [f.name for f in fields(TransformerConfig)]
