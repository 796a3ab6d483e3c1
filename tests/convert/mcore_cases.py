"""Megatron-LM checkpoints for the mcore-import tests, made by megatron-core itself on CPU.

Run as a script (`python mcore_cases.py OUT KIND [LOAD]`) in its own process: it builds a megatron-core
GPTModel (local layer spec) with random weights, saves it the way Megatron-LM's training loop does
(torch_dist under OUT/torch_dist with the run args in common.pt, and the legacy
mp_rank_00/model_optim_rng.pt under OUT/legacy) and writes the model's logits for fixed token ids
to OUT/reference.pt; with LOAD, megatron-core loads that torch_dist checkpoint into the model
instead and writes its logits to OUT/loaded.pt. The CPU patches below (no CUDA device, no CUDA RNG tracker) live only in
that process."""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
from pathlib import Path

import torch

VOCAB, PADDED = 100, 128  # tokens (NullTokenizer: 99 ids + EOD), rows of the embedding
ITERATION = 5


def megatron_args(kind: str) -> argparse.Namespace:
    """The run args Megatron-LM would save for the model `build` makes (its names)."""
    common = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32,
                  max_position_embeddings=32, tokenizer_type="NullTokenizer",
                  vocab_size=VOCAB - 1, padded_vocab_size=PADDED,
                  make_vocab_size_divisible_by=128, hidden_dropout=0.0, attention_dropout=0.0,
                  init_method_std=0.02, kv_channels=16, apply_layernorm_1p=False,
                  qk_layernorm=False, num_experts=None, iteration=ITERATION,
                  ckpt_format="torch_dist", params_dtype=torch.float32)
    if kind in ("gpt2", "gpt2-erf"):  # gpt2-erf: no fused bias-GELU, so the exact GELU
        return argparse.Namespace(**common, ffn_hidden_size=256, normalization="LayerNorm",
                                  norm_epsilon=1e-5, swiglu=False, add_bias_linear=True,
                                  bias_gelu_fusion=kind == "gpt2", openai_gelu=False,
                                  position_embedding_type="learned_absolute",
                                  group_query_attention=False, num_query_groups=1,
                                  untie_embeddings_and_output_weights=False)
    return argparse.Namespace(**common, ffn_hidden_size=96, normalization="RMSNorm",
                              norm_epsilon=1e-6, swiglu=True, add_bias_linear=False,
                              bias_gelu_fusion=False, position_embedding_type="rope",
                              rotary_base=5000, rotary_percent=1.0, group_query_attention=True,
                              num_query_groups=2, untie_embeddings_and_output_weights=True)


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def _cpu_only() -> None:
    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def build(a: argparse.Namespace):
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups if a.group_query_attention else None,
        ffn_hidden_size=a.ffn_hidden_size, use_cpu_initialization=True,
        gated_linear_unit=a.swiglu, activation_func=F.silu if a.swiglu else F.gelu,
        bias_activation_fusion=a.bias_gelu_fusion, normalization=a.normalization,
        add_bias_linear=a.add_bias_linear, hidden_dropout=0.0, attention_dropout=0.0,
        layernorm_epsilon=a.norm_epsilon)
    model = GPTModel(cfg, get_gpt_layer_local_spec(normalization=a.normalization),
                     vocab_size=PADDED, max_sequence_length=a.max_position_embeddings,
                     position_embedding_type=a.position_embedding_type,
                     rotary_base=getattr(a, "rotary_base", 10000),
                     share_embeddings_and_output_weights=not
                     a.untie_embeddings_and_output_weights)
    torch.manual_seed(1)
    with torch.no_grad():  # decisive logits, and norms/biases that are not all 1 / 0
        for name, p in model.named_parameters():
            p.copy_(p * 3 if p.dim() > 1 else
                    (1 if "norm" in name else 0) + 0.2 * torch.randn_like(p))
    return model.eval()


def logits(model) -> torch.Tensor:
    x = ids()
    s = x.shape[1]
    with torch.no_grad():
        out = model(x, torch.arange(s)[None].expand_as(x),
                    attention_mask=torch.triu(torch.ones(1, 1, s, s), 1).bool())
    return out[..., :VOCAB]


def save_torch_dist(model, a: argparse.Namespace, root: Path) -> None:
    from megatron.core import dist_checkpointing

    path = root / f"iter_{ITERATION:07d}"
    path.mkdir(parents=True)
    state = {"model": model.sharded_state_dict(), "args": a, "iteration": ITERATION,
             "checkpoint_version": 3.0}
    dist_checkpointing.save(state, str(path))
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def save_legacy(model, a: argparse.Namespace, root: Path) -> None:
    """Megatron-LM's legacy layout: rng state with numpy's, as the training loop saves it."""
    import numpy as np

    path = root / f"iter_{ITERATION:07d}" / "mp_rank_00"
    path.mkdir(parents=True)
    rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state()}]
    torch.save({"args": a, "checkpoint_version": 3.0, "iteration": ITERATION,
                "model": model.state_dict(), "rng_state": rng}, path / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def load_logits(model, root: Path) -> torch.Tensor:
    """The logits of `model` after megatron-core loads the torch_dist checkpoint `root`."""
    from megatron.core import dist_checkpointing

    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(root / f"iter_{int(it):07d}"))
    model.load_state_dict(loaded, strict=False)
    return logits(model)


def main(out: Path, kind: str, load: Path | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 2000),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    _cpu_only()
    a = megatron_args(kind)
    model = build(a)
    if load is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        torch.save(load_logits(model, load), out / "loaded.pt")
        dist.destroy_process_group()
        return
    torch.save(logits(model), out / "reference.pt")
    save_legacy(model, a, out / "legacy")
    save_torch_dist(model, a, out / "torch_dist")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else None)
