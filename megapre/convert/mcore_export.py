"""mcore-export: a megapre GPT checkpoint -> a Megatron-LM torch_dist checkpoint.

The checkpoint is loaded in one process, its weights are copied into a megatron-core GPTModel
(local layer spec) built on the CPU, and megatron.core.dist_checkpointing saves that model with
Megatron-LM's run args in common.pt, so Megatron-LM (`--load`, `--use-checkpoint-args`) and
mcore-import read it. megatron-core is only imported here. It expects a CUDA device and a
model-parallel process group: a one-process gloo group is made, and the CUDA queries it makes on
the CPU path are answered for the duration of the save only."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch

from megapre.model.config import ConfigError

from .hf import _refuse_existing, _single_process
from .mcore import LAYER_NAMES, TOP_NAMES
from .mcore_files import LATEST
from .vocab import unpadded

ITERATION = 0


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    load: Path
    save: Path
    iteration: int | None = None


def mcore_export(args: ExportArgs) -> Path:
    """Write the Megatron-LM directory; returns it."""
    _refuse_existing(args.save)
    _require_writer()
    state, m, data, vocab = _read(args)
    tmp = args.save.with_name(args.save.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save(tmp, state, m, data, vocab)
        if args.save.exists():
            args.save.rmdir()  # empty (checked above)
        tmp.rename(args.save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return args.save


def _require_writer() -> None:
    """megatron-core's checkpoint writer needs psutil in its worker; without it the save hangs
    rather than fails, so check first."""
    absent = [name for name in ("megatron.core", "psutil") if _absent(name)]
    if absent:
        raise ConfigError(f"mcore-export writes with megatron-core's dist_checkpointing, which "
                          f"needs {' and '.join(absent)}: pip install megatron-core psutil")


def _absent(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package is missing
        return True


def _read(args: ExportArgs) -> tuple[dict[str, torch.Tensor], dict, dict, int]:
    """(megapre state without vocabulary padding, model args, data args, vocabulary size)."""
    from megapre.inference import checkpoint_io
    from megapre.model import init
    from megapre.train.runtime import build_runtime

    path = checkpoint_io.resolve(str(args.load), args.iteration)
    cfg = checkpoint_io.saved_config(path)
    m = dataclasses.asdict(cfg.model)
    _refuse_model(m)
    _single_process(cfg)
    with init.skipped():  # the checkpoint's weights replace them
        rt = build_runtime(cfg)
    try:
        checkpoint_io.load_weights(path, rt)
        vocab = rt.tokenizer.vocab_size
        m["ffn_hidden_size"] = cfg.transformer_config(vocab).ffn_hidden_size  # None: resolved

        state = {n: unpadded(p.detach().clone(), n, vocab)
                 for n, p in rt.model.models[0].named_parameters()}
    finally:
        rt.mesh.destroy()
    return state, m, dataclasses.asdict(cfg.data), vocab


def _refuse_model(m: dict) -> None:
    if m["model"] != "gpt":
        raise ConfigError(f"mcore-export: --model {m['model']} checkpoints are not supported "
                          "(GPT checkpoints are)")
    if m["share_layers_every"] != 1 or m["embedding_size"] is not None:
        raise ConfigError("mcore-export: megatron-core has no --share-layers-every or "
                          "--embedding-size (ALBERT's sharing); export this model with "
                          "megapre-convert onnx")
    if m["post_layernorm"]:
        raise ConfigError("mcore-export: megatron-core has no --post-layernorm blocks; export "
                          "this model with hf-export")
    if m["squared_relu"] or (not (m["swiglu"] or m["erf_gelu"]) and m["disable_bias_linear"]):
        raise ConfigError("mcore-export: the MLP must be SwiGLU, exact GELU (--erf-gelu), or "
                          "tanh GELU with biases (megapre's tanh GELU is megatron-core's fused "
                          "bias-GELU)")


def megatron_args(m: dict, data: dict, vocab: int, padded: int) -> argparse.Namespace:
    """The run args Megatron-LM saves with a checkpoint, for this model (its names)."""
    h, heads = m["hidden_size"], m["num_attention_heads"]
    groups = (m["num_query_groups"] or heads) if m["group_query_attention"] else heads
    seq = m["seq_length"]
    return argparse.Namespace(
        num_layers=m["num_layers"], hidden_size=h, num_attention_heads=heads,
        group_query_attention=groups != heads, num_query_groups=groups,
        ffn_hidden_size=m["ffn_hidden_size"], kv_channels=m["kv_channels"] or h // heads,
        seq_length=seq, max_position_embeddings=m["max_position_embeddings"] or seq,
        normalization=m["normalization"], norm_epsilon=m["norm_epsilon"],
        apply_layernorm_1p=m["apply_layernorm_1p"], qk_layernorm=m["qk_layernorm"],
        swiglu=m["swiglu"], squared_relu=False, openai_gelu=False,
        bias_gelu_fusion=not (m["swiglu"] or m["erf_gelu"]), add_bias_linear=not m["disable_bias_linear"],
        position_embedding_type=m["position_embedding_type"], rotary_base=m["rotary_base"],
        rotary_percent=m["rotary_percent"], rotary_interleaved=m["rotary_interleaved"],
        untie_embeddings_and_output_weights=m["untie_embeddings_and_output_weights"],
        hidden_dropout=m["hidden_dropout"], attention_dropout=m["attention_dropout"],
        init_method_std=m["init_method_std"],
        make_vocab_size_divisible_by=m["make_vocab_size_divisible_by"],
        padded_vocab_size=padded, tokenizer_type=data["tokenizer_type"],
        vocab_size=data["vocab_size"], vocab_file=data["vocab_file"],
        merge_file=data["merge_file"], tokenizer_model=data["tokenizer_model"],
        num_experts=None, iteration=ITERATION, ckpt_format="torch_dist",
        transformer_impl="local", tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, params_dtype=torch.float32)


def _padded(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def mcore_state(state: dict[str, torch.Tensor], m: dict, padded: int
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """megatron-core local-spec names for megapre's (the inverse of mcore-import's mapping);
    vocabulary tables are zero-padded to Megatron's padded size."""
    top = {v: k for k, v in TOP_NAMES.items()}
    layer = {v: k for k, v in LAYER_NAMES.items() if "layer_norm" not in k}
    for name, t in state.items():
        if name in top:
            if name in ("embedding.word.weight", "output_layer.weight"):
                t = torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
            yield top[name], t
            continue
        prefix, module, leaf = _split(name)
        if module == "mlp.gate":
            continue  # joined with mlp.fc1 below
        if module == "mlp.fc1":
            if m["swiglu"]:
                t = torch.cat([state[f"{prefix}mlp.gate.{leaf}"], t])
            yield f"{prefix}mlp.linear_fc1.{leaf}", t
        else:
            yield f"{prefix}{layer[module]}.{leaf}", t


def _split(name: str) -> tuple[str, str, str]:
    """'decoder.layers.3.attention.qkv.weight' -> ('decoder.layers.3.', 'attention.qkv',
    'weight')."""
    parts = name.split(".")
    return ".".join(parts[:3]) + ".", ".".join(parts[3:-1]), parts[-1]


@contextlib.contextmanager
def _megatron_process_group() -> Iterator[None]:
    """A one-process gloo group with megatron-core's model-parallel groups (TP1, PP1), and the
    CUDA queries megatron-core's CPU path makes answered by the CPU; all undone afterwards."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megapre.parallel.testing import free_port

    if dist.is_initialized():
        raise ConfigError("mcore-export runs in one process of its own (not under torchrun)")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = (torch.cuda.current_device, torch.cuda.synchronize, tracker.fork)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *a, **k: None
        tracker.fork = lambda *a, **k: contextlib.nullcontext()
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize, tracker.fork = saved
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _build(a: argparse.Namespace):
    """megatron-core's GPTModel for these args (local layer spec, fp32, on the CPU)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
        ffn_hidden_size=a.ffn_hidden_size, kv_channels=a.kv_channels,
        use_cpu_initialization=True, perform_initialization=False,
        gated_linear_unit=a.swiglu, activation_func=F.silu if a.swiglu else F.gelu,
        bias_activation_fusion=a.bias_gelu_fusion, normalization=a.normalization,
        layernorm_epsilon=a.norm_epsilon, layernorm_zero_centered_gamma=a.apply_layernorm_1p,
        qk_layernorm=a.qk_layernorm, rotary_interleaved=a.rotary_interleaved,
        add_bias_linear=a.add_bias_linear, hidden_dropout=a.hidden_dropout,
        attention_dropout=a.attention_dropout, init_method_std=a.init_method_std)
    spec = get_gpt_layer_local_spec(normalization=a.normalization, qk_layernorm=a.qk_layernorm)
    return GPTModel(cfg, spec, vocab_size=a.padded_vocab_size,
                    max_sequence_length=a.max_position_embeddings,
                    position_embedding_type=a.position_embedding_type,
                    rotary_percent=a.rotary_percent, rotary_base=int(a.rotary_base),
                    share_embeddings_and_output_weights=not
                    a.untie_embeddings_and_output_weights)


def _save(out: Path, state: dict[str, torch.Tensor], m: dict, data: dict, vocab: int) -> None:
    try:
        with warnings.catch_warnings():  # megatron-core's notes on missing optional kernels
            warnings.simplefilter("ignore")
            from megatron.core import dist_checkpointing
            from megatron.core.models.gpt import gpt_layer_specs  # noqa: F401
    except ImportError as e:
        raise ConfigError("mcore-export writes with megatron-core: pip install megatron-core"
                          ) from e
    padded = _padded(vocab, m["make_vocab_size_divisible_by"])
    a = megatron_args(m, data, vocab, padded)
    with _megatron_process_group(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's deprecation notes on its own defaults
        model = _build(a)
        weights = dict(mcore_state(state, m, padded))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConfigError(f"mcore-export: megatron-core's GPTModel and the checkpoint disagree "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        path = out / f"iter_{ITERATION:07d}"
        path.mkdir(parents=True)
        dist_checkpointing.save({"model": model.sharded_state_dict(), "args": a,
                                 "iteration": ITERATION, "checkpoint_version": 3.0}, str(path))
    (out / LATEST).write_text(f"{ITERATION}\n")
