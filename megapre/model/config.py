"""The one description of a transformer that GPT and BERT share.

Field names follow Megatron's flags (``--num-layers`` -> ``num_layers``) so a config file or a
command line written for Megatron maps one to one. ``validate`` checks a model against itself and,
through megapre.parallel.layout (where every layout rule lives), against a parallel layout; every
message names the flag and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megapre.errors import ConfigError
from megapre.parallel.layout import EVEN, StageSplit, check_model_split

NORMS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "gelu_erf", "swiglu", "squared_relu")  # gelu: tanh approximation
POSITIONS = ("learned_absolute", "rope", "none")
def swiglu_ffn_hidden_size(hidden_size: int) -> int:
    """Megatron's default SwiGLU width: int((4 * h * 2 / 3) / 64) * 64."""
    return int((4 * hidden_size * 2 / 3) / 64) * 64


def legacy_swiglu_ffn_hidden_size(hidden_size: int) -> int:
    """megapre's default before config version 2 (8h/3 rounded up to 256), for old configs."""
    return int(math.ceil(8 * hidden_size / 3 / 256) * 256)


ATTENTION_BACKENDS = ("auto", "fused", "sdpa", "sdpa-flash", "sdpa-efficient")


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
    rotary_interleaved: bool = False  # RoPE rotates adjacent channel pairs (--rotary-interleaved)
    qk_layernorm: bool = False  # norm over head_dim on queries and keys (--qk-layernorm)
    layernorm_zero_centered_gamma: bool = False  # norm weights stored as gamma - 1 (--apply-layernorm-1p)
    post_layernorm: bool = False  # original BERT: norm after each residual add (--post-layernorm)
    share_layers_every: int = 1  # ALBERT: layers [jK, (j+1)K) reuse one weight set (1 = none)
    embedding_size: int | None = None  # ALBERT's factorized embedding width E; None = hidden
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
        """4h for GELU; for SwiGLU Megatron's rule, 2/3 of 4h rounded down to a multiple of 64
        (about the parameter count of the 4h GELU MLP; h=512 -> 1344)."""
        if self.activation == "swiglu":
            return swiglu_ffn_hidden_size(self.hidden_size)
        return 4 * self.hidden_size

    @property
    def embedding_dim(self) -> int:
        """Width of the word / position / token-type tables (--embedding-size, else hidden)."""
        return self.embedding_size or self.hidden_size

    @property
    def factorized_embedding(self) -> bool:
        """The tables are narrower than hidden and projected up (and the tied head down)."""
        return self.embedding_size is not None

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
                 virtual_stages: int | None = None, sequence_parallel: bool = False,
                 stage_split: StageSplit = EVEN) -> None:
        """Raise ConfigError naming the flag when the model or its layout cannot work."""
        _positive(self, ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                         "ffn_hidden_size", "kv_channels", "vocab_size", "seq_length",
                         "max_position_embeddings", "make_vocab_size_divisible_by"))
        if getattr(self, "_derived_kv_channels", False) and \
                self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size={self.hidden_size} is not divisible by --num-attention-heads="
                f"{self.num_attention_heads}; change one of them or give --kv-channels explicitly")
        e = self.embedding_size
        if e is not None and not (isinstance(e, int) and 0 < e < self.hidden_size):
            raise ConfigError(f"--embedding-size={self.embedding_size!r} must be a positive "
                              f"integer below --hidden-size={self.hidden_size} (or unset)")
        _choice(self, "normalization", NORMS)
        _choice(self, "activation", ACTIVATIONS)
        _choice(self, "position_embedding_type", POSITIONS)
        _choice(self, "attention_backend", ATTENTION_BACKENDS)
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(name)}={getattr(self, name)} must be in [0, 1)")
        if self.position_embedding_type == "learned_absolute" and \
                self.seq_length > self.max_position_embeddings:
            raise ConfigError(
                f"--seq-length={self.seq_length} exceeds --max-position-embeddings="
                f"{self.max_position_embeddings}; raise --max-position-embeddings or shorten the "
                "sequences")
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head dim, got --kv-channels="
                              f"{self.head_dim}")
        check_model_split(num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
                          num_query_groups=self.num_query_groups,
                          ffn_hidden_size=self.ffn_hidden_size, seq_length=self.seq_length,
                          tp=tensor_parallel, pp=pipeline_parallel, virtual=virtual_stages,
                          sequence_parallel=sequence_parallel, split=stage_split,
                          share_layers_every=self.share_layers_every)

    def shared_owner(self, layer: int) -> int:
        """The layer whose weights `layer` uses: the first of its --share-layers-every group."""
        return layer - layer % self.share_layers_every


def _positive(cfg: TransformerConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{_flag(name)}={value!r} must be a positive integer")


def _choice(cfg: TransformerConfig, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"{_flag(name)}={getattr(cfg, name)!r} is not one of {', '.join(allowed)}")

