"""mcore-import: a megatron-core GPTModel checkpoint (Megatron-LM's torch_dist or legacy
model_optim_rng.pt) -> a megapre checkpoint.

The architecture and tokenizer come from the run args saved with the checkpoint, or, for a
model-only save (megatron-core's dist_checkpointing used outside Megatron-LM's training loop), from
the launch script's Megatron-LM flags given as one string (`--megatron-args`, which also overrides
saved args); tokenizer flags on the command line override both. Like hf-import, the model is built once in one process, every
tensor is copied in and an iteration-0 checkpoint is saved with its run config and tokenizer, so
it loads under any layout. megatron-core's fused qkv rows are already megapre's per-group layout;
a SwiGLU fc1 holds [gate; up] (the activation applies to its first half)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Iterator

import torch

from megapre.model.config import ConfigError
from megapre.train.args import PretrainConfig

from . import mcore_files
from .hf import _refuse_existing
from .vocab import is_vocab_table, write_padded

TOKENIZER_DIR = "mcore_tokenizer"
TOKENIZER_KEYS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")
# megatron-core name inside decoder.layers.{i} -> megapre's (local spec and TE spellings)
LAYER_NAMES = {
    "input_layernorm": "norm1", "self_attention.linear_qkv.layer_norm": "norm1",
    "pre_mlp_layernorm": "norm2", "mlp.linear_fc1.layer_norm": "norm2",
    "self_attention.linear_qkv": "attention.qkv", "self_attention.linear_proj": "attention.proj",
    "self_attention.q_layernorm": "attention.q_norm",
    "self_attention.k_layernorm": "attention.k_norm",
    "mlp.linear_fc2": "mlp.fc2",
}
TOP_NAMES = {"embedding.word_embeddings.weight": "embedding.word.weight",
             "embedding.position_embeddings.weight": "embedding.position.weight",
             "decoder.final_layernorm.weight": "final_norm.weight",
             "decoder.final_layernorm.bias": "final_norm.bias",
             "output_layer.weight": "output_layer.weight"}
# run args naming features megapre's GPT does not have
UNSUPPORTED = {"num_experts": "mixture of experts (--num-experts)",
               "multi_latent_attention": "multi-latent attention (--multi-latent-attention)",
               "mtp_num_layers": "multi-token prediction (--mtp-num-layers)",
               "use_rope_scaling": "RoPE scaling (--use-rope-scaling)",
               "fp8_param_gather": "fp8 weights (--fp8-param-gather)",
               "quick_geglu": "quick GeGLU (--quick-geglu)",
               "heterogeneous_layers_config_path": "heterogeneous layers",
               "apply_residual_connection_post_layernorm":
                   "the residual taken after the norm (--apply-residual-connection-post-layernorm)"}


@dataclasses.dataclass(frozen=True)
class ImportArgs:
    load: Path
    save: Path
    iteration: int | None = None
    tokenizer: dict = dataclasses.field(default_factory=dict)  # flags given: override the args
    megatron_args: str | None = None  # Megatron-LM flags as one string: override the saved args


def mcore_import(args: ImportArgs) -> Path:
    """Convert; returns the checkpoint directory written."""
    path = mcore_files.resolve(args.load, args.iteration)
    kind = mcore_files.format_of(path)
    with _quiet():
        margs, tensors = (mcore_files.read_torch_dist(path) if kind == "torch_dist"
                          else mcore_files.read_legacy(path))
    if args.megatron_args is not None:
        margs = {**(margs or {}), **parse_megatron_args(args.megatron_args)}
    if margs is None:
        raise ConfigError(f"{path}: no run args saved with the weights (a model-only save); "
                          "give the model's Megatron-LM flags: --megatron-args \"--num-layers N "
                          "--hidden-size H --num-attention-heads A ...\"")
    cfg = PretrainConfig()
    for key, value in model_args(margs, str(path)).items():
        setattr(cfg.model, key, value)
    cfg.model.model = "gpt"
    cfg.train.device = "cpu"
    _refuse_existing(args.save)
    args.save.mkdir(parents=True, exist_ok=True)
    try:
        _write_checkpoint(args, path, kind, margs, tensors, cfg)
    except BaseException:
        shutil.rmtree(args.save, ignore_errors=True)  # it was new or empty: nothing is lost
        raise
    return args.save


# flags whose Megatron-LM destination is not the flag's own name
NEGATIVE_FLAGS = {"disable_bias_linear": "add_bias_linear",
                  "no_position_embedding": "add_position_embedding"}


def parse_megatron_args(text: str) -> dict:
    """Megatron-LM's args (its dest names) from launch flags in one string: `--name value`
    (int, float or text), `--switch` (True), `--no-name` / `--disable-bias-linear` (False).
    Flags that do not describe the model or tokenizer (--lr, --data-path ...) are read and
    ignored like the rest of Megatron's saved args."""
    import shlex

    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"--megatron-args: {e} (quote it as one shell string)") from None
    out: dict = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) < 3:
            raise ConfigError(f"--megatron-args: {word!r} is not a --flag (values follow their "
                              "flag: '--num-layers 24')")
        name = word[2:].replace("-", "_")
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            out[name] = _value(words[i + 1])
            i += 2
            continue
        if name in NEGATIVE_FLAGS:
            out[NEGATIVE_FLAGS[name]] = False
        elif name.startswith("no_"):
            out[name[3:]] = False
        else:
            out[name] = True
        i += 1
    return out


def _value(word: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(word)
        except ValueError:
            pass
    return word


def _quiet():
    from megapre.train.checkpoint import _quiet_single_process

    return _quiet_single_process()


def _refuse_features(a: dict, where: str) -> None:
    for key, what in UNSUPPORTED.items():
        if a.get(key):
            raise ConfigError(f"{where}: {what} ({key}={a[key]!r}) is not supported by megapre")
    if a.get("add_qkv_bias") and not a.get("add_bias_linear", True):
        raise ConfigError(f"{where}: add_qkv_bias without add_bias_linear (a bias on qkv only) "
                          "is not supported by megapre")
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if not a.get(key):
            raise ConfigError(f"{where}: the saved args have no {key}")


def _activation(a: dict) -> dict:
    """Megatron's GELU is the tanh approximation with --openai-gelu or its fused bias-GELU
    (bias_gelu_fusion and biases), megapre's default; otherwise it is the exact (erf) GELU,
    megapre's --erf-gelu."""
    if a.get("swiglu"):
        return {"swiglu": True}
    if a.get("squared_relu"):
        return {"squared_relu": True}
    tanh = a.get("openai_gelu") or (a.get("bias_gelu_fusion", True) and
                                    a.get("add_bias_linear", True))
    return {} if tanh else {"erf_gelu": True}


def model_args(a: dict, where: str) -> dict:
    """megapre ModelArgs fields from Megatron-LM's args (its names, its defaults)."""
    _refuse_features(a, where)
    pos = a.get("position_embedding_type", "learned_absolute")
    if pos not in ("learned_absolute", "rope", "none"):
        raise ConfigError(f"{where}: position_embedding_type {pos!r} is not supported "
                          "(learned_absolute, rope, none)")
    norm = a.get("normalization", "LayerNorm")
    if norm not in ("LayerNorm", "RMSNorm"):
        raise ConfigError(f"{where}: normalization {norm!r} is not supported")
    h, heads = int(a["hidden_size"]), int(a["num_attention_heads"])
    groups = a.get("num_query_groups") if a.get("group_query_attention") else None
    d = a.get("kv_channels")
    seq = int(a.get("seq_length") or a.get("max_position_embeddings") or 1024)
    out = {"num_layers": int(a["num_layers"]), "hidden_size": h, "num_attention_heads": heads,
           "group_query_attention": bool(groups and groups != heads),
           "num_query_groups": groups if groups and groups != heads else None,
           "ffn_hidden_size": a.get("ffn_hidden_size"),
           "kv_channels": d if d and d != h // heads else None,
           "seq_length": seq, "max_position_embeddings": a.get("max_position_embeddings") or seq,
           "normalization": norm,
           "norm_epsilon": float(a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))),
           "apply_layernorm_1p": bool(a.get("apply_layernorm_1p")),
           "qk_layernorm": bool(a.get("qk_layernorm")), "position_embedding_type": pos,
           "rotary_base": float(a.get("rotary_base", 10000)),
           "rotary_percent": float(a.get("rotary_percent", 1.0)),
           "rotary_interleaved": bool(a.get("rotary_interleaved")),
           "disable_bias_linear": not a.get("add_bias_linear", True),
           "untie_embeddings_and_output_weights":
               bool(a.get("untie_embeddings_and_output_weights")),
           "hidden_dropout": float(a.get("hidden_dropout", 0.1)),
           "attention_dropout": float(a.get("attention_dropout", 0.1)),
           "init_method_std": float(a.get("init_method_std", 0.02)),
           "make_vocab_size_divisible_by": int(a.get("make_vocab_size_divisible_by") or 128)}
    out.update(_activation(a))
    return out


def _tokenizer_fields(args: ImportArgs, margs: dict, save: Path) -> dict:
    """Tokenizer flags given, else the saved args'; its files are copied into the checkpoint so
    it keeps working when the Megatron run's files move."""
    given = {k: v for k, v in args.tokenizer.items() if v is not None}
    saved = {k: margs[k] for k in TOKENIZER_KEYS if margs.get(k) is not None}
    other = given.get("tokenizer_type") not in (None, saved.get("tokenizer_type"))
    fields = given if other else {**saved, **given}  # e.g. only --vocab-file: a moved file
    if not fields.get("tokenizer_type"):
        raise ConfigError(f"{args.load}: the saved args name no tokenizer; give --tokenizer-type "
                          "(and its files)")
    for key in ("vocab_file", "merge_file", "tokenizer_model"):
        if fields.get(key):
            fields[key] = _copy_tokenizer_file(Path(fields[key]), key, save)
    return fields


def _copy_tokenizer_file(src: Path, key: str, save: Path) -> str:
    if not src.exists():
        raise ConfigError(f"the checkpoint's {key} {src} does not exist here; give "
                          f"--{key.replace('_', '-')} PATH")
    dest = save / TOKENIZER_DIR / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy2(src, dest)
    return str(dest.resolve())


def _write_checkpoint(args: ImportArgs, path: Path, kind: str, margs: dict,
                      tensors: dict[str, torch.Tensor], cfg: PretrainConfig) -> None:
    from megapre.data.tokenizers import build_tokenizer
    from megapre.model import init
    from megapre.train.checkpoint import save_checkpoint
    from megapre.train.runtime import build_runtime

    for key, value in _tokenizer_fields(args, margs, args.save).items():
        setattr(cfg.data, key, value)
    tokenizer = build_tokenizer(cfg.tokenizer_config())
    with init.skipped():  # every weight is overwritten below
        rt = build_runtime(cfg, tokenizer=tokenizer)
    try:
        _load_weights(path, tensors, rt.model.models[0], cfg, tokenizer.vocab_size)
        save_checkpoint(args.save, 0, rt.model, None, rt.mesh, config=cfg.to_dict(),
                        tracker=rt.tracker, tokenizer=tokenizer.describe(),
                        extra={"converted_from": {"megatron_dir": str(path.resolve()),
                                                  "format": kind,
                                                  "iteration": margs.get("iteration")}})
    finally:
        rt.mesh.destroy()


def map_weights(tensors: dict[str, torch.Tensor], swiglu: bool, where: str
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """megapre names for megatron-core's; any tensor left unmapped is an error naming it."""
    for name, t in tensors.items():
        if t.dtype.is_floating_point and t.dtype.itemsize == 1:
            raise ConfigError(f"{where}: {name} is stored in {t.dtype} (fp8 weights); megapre "
                              "reads fp32/bf16/fp16 weights")
        if name in TOP_NAMES:
            yield TOP_NAMES[name], t
        elif name.startswith("decoder.layers."):
            yield from _layer_weight(name, t, swiglu, where)
        else:
            raise ConfigError(f"{where}: {name} has no megapre counterpart")


def _layer_weight(name: str, t: torch.Tensor, swiglu: bool, where: str
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    index, rest = name[len("decoder.layers."):].split(".", 1)
    dst = f"decoder.layers.{index}."
    module, _, leaf = rest.rpartition(".")
    if leaf in ("layer_norm_weight", "layer_norm_bias"):  # TE's norm fused into the linear
        module, leaf = f"{module}.layer_norm", leaf[len("layer_norm_"):]
    if module == "mlp.linear_fc1":
        if swiglu:
            gate, up = t.chunk(2, 0)
            yield dst + "mlp.gate." + leaf, gate
            yield dst + "mlp.fc1." + leaf, up
        else:
            yield dst + "mlp.fc1." + leaf, t
    elif module in LAYER_NAMES and leaf in ("weight", "bias"):
        yield dst + LAYER_NAMES[module] + "." + leaf, t
    else:
        what = "mixture of experts" if ".experts." in name or ".router." in name else \
            "a module megapre's GPT layer does not have"
        raise ConfigError(f"{where}: {name} ({what}) has no megapre counterpart")


def _load_weights(path: Path, tensors: dict[str, torch.Tensor], model: torch.nn.Module,
                  cfg: PretrainConfig, vocab: int) -> None:
    params = dict(model.named_parameters())
    done = set()
    for name, t in map_weights(tensors, cfg.model.swiglu, str(path)):
        if name == "output_layer.weight" and name not in params:
            continue  # tied embeddings: a copy of the word embeddings some saves include
        if name not in params:
            raise ConfigError(f"{path}: megapre's model has no {name} (the saved args and "
                              "weights disagree?)")
        if is_vocab_table(name):
            if t.shape[0] < vocab:
                raise ConfigError(f"{path}: the tokenizer has {vocab} tokens but {name} has "
                                  f"{t.shape[0]} rows (the tokenizer of another model?)")
            t = t[:vocab]  # Megatron's padding rows; megapre pads to its own multiple
        write_padded(params[name], t.float(), name)
        done.add(name)
    left = sorted(set(params) - done)
    if left:
        raise ConfigError(f"{path}: no weights for {', '.join(left[:5])}")
