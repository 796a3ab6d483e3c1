"""Our tensor-parallel layers against megatron-core's `tensor_parallel` layers on the same weights
and inputs (megatron-core on CPU: gloo, use_cpu_initialization=True).

megatron-core's sequence-parallel collectives allocate their output buffers with
`torch.cuda.current_device()`; on a machine without a GPU the worker points that at the CPU
(`_cpu_current_device`), which changes where the buffers live and nothing else.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from megapre.parallel import (ColumnParallelLinear, ParallelConfig, ParallelMesh, RowParallelLinear,
                              VocabParallelEmbedding, load_full_param, padded_vocab_size,
                              vocab_parallel_cross_entropy)
from megapre.parallel.testing import run_distributed

S, B, H, FFN, VOCAB = 8, 2, 12, 16, 50
TOL = dict(rtol=1e-5, atol=1e-6)
HAVE_MCORE = importlib.util.find_spec("megatron") is not None and \
    importlib.util.find_spec("megatron.core") is not None


def _data(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _fwd_bwd(layer, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(x.is_floating_point())
    out = layer(x)
    y = out[0] if isinstance(out, tuple) else out
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), (x.grad if x.requires_grad else None), grads


def _compare(ours, theirs, what: str) -> None:
    (y1, gx1, gp1), (y2, gx2, gp2) = ours, theirs
    assert_close(y1, y2, **TOL, msg=lambda m: f"{what} output: {m}")
    if gx1 is not None:
        assert_close(gx1, gx2, **TOL, msg=lambda m: f"{what} input grad: {m}")
    assert gp1.keys() == gp2.keys(), (what, gp1.keys(), gp2.keys())
    for name in gp1:
        assert_close(gp1[name], gp2[name], **TOL, msg=lambda m: f"{what} {name} grad: {m}")


def _check_vs_megatron(rank: int, world: int) -> str:
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if not torch.cuda.is_available():
        torch.cuda.current_device = _cpu_current_device
    import warnings
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mtp
    from megatron.core.model_parallel_config import ModelParallelConfig

    # TP = world size: two processes only, since each pays megatron-core's ~5 s import (TP=4
    # against the single-process math is covered in test_parallel_layers.py).
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    _compare_layers(world, mtp, ModelParallelConfig)
    parallel_state.destroy_model_parallel()
    return "ok"


def _compare_layers(tp: int, mtp, ModelParallelConfig) -> None:
    init = functools.partial(nn.init.normal_, std=0.5)  # both sides draw from the global RNG
    for sp in (False, True):
        mesh = ParallelMesh.init(ParallelConfig(tensor_parallel=tp, sequence_parallel=sp))
        cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp,
                                  use_cpu_initialization=True, params_dtype=torch.float32)
        r = mesh.tp_rank
        seq = (lambda t: t.chunk(tp, 0)[r]) if sp else (lambda t: t)

        # Column-parallel linear (output left sharded).
        torch.manual_seed(1)
        ours = ColumnParallelLinear(H, FFN, mesh, init_method=init)
        torch.manual_seed(1)
        theirs = mtp.ColumnParallelLinear(H, FFN, config=cfg, init_method=init, bias=True,
                                          gather_output=False)
        assert torch.equal(ours.weight, theirs.weight), "same seed, same init: same shard"
        bias = _data(FFN, seed=2)
        load_full_param(ours.bias, bias, mesh)
        with torch.no_grad():
            theirs.bias.copy_(ours.bias)
        x, g = seq(_data(S, B, H, seed=3)), _data(S, B, FFN, seed=4).chunk(tp, -1)[r]
        _compare(_fwd_bwd(ours, x, g), _fwd_bwd(theirs, x, g), f"column sp={sp}")

        # Row-parallel linear (input already split over features).
        torch.manual_seed(5)
        ours = RowParallelLinear(FFN, H, mesh, init_method=init)
        torch.manual_seed(5)
        theirs = mtp.RowParallelLinear(FFN, H, config=cfg, init_method=init, bias=True,
                                       input_is_parallel=True, skip_bias_add=False)
        assert torch.equal(ours.weight, theirs.weight)
        with torch.no_grad():
            ours.bias.copy_(_data(H, seed=6))
            theirs.bias.copy_(ours.bias)
        x, g = _data(S, B, FFN, seed=7).chunk(tp, -1)[r], seq(_data(S, B, H, seed=8))
        _compare(_fwd_bwd(ours, x, g), _fwd_bwd(theirs, x, g), f"row sp={sp}")

        # Vocab-parallel embedding (Megatron reduce-scatters [b, s] ids into [s/tp, b, h]).
        padded = padded_vocab_size(VOCAB, 8, tp)
        torch.manual_seed(9)
        ours = VocabParallelEmbedding(padded, H, mesh, init_method=init, sequence_parallel=sp)
        torch.manual_seed(9)
        theirs = mtp.VocabParallelEmbedding(padded, H, init_method=init, config=cfg,
                                            reduce_scatter_embeddings=sp)
        assert torch.equal(ours.weight, theirs.weight)
        ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(10))
        g = seq(_data(S, B, H, seed=11))
        o = _fwd_bwd(ours, ids.t(), g)
        t = _fwd_bwd(theirs, ids, g if sp else g.transpose(0, 1))
        if not sp:
            t = (t[0].transpose(0, 1), t[1], t[2])
        _compare(o, t, f"embedding sp={sp}")

    # Cross entropy: Megatron keeps padding columns as classes, so compare on an unpadded vocab;
    # Megatron's label smoothing rescales e by V/(V-1), so compare without smoothing.
    vocab = 16 * tp
    logits = _data(S, B, vocab, seed=12).mul(5).chunk(tp, -1)[r]
    target = torch.randint(0, vocab, (S, B), generator=torch.Generator().manual_seed(13))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = vocab_parallel_cross_entropy(a, target, mesh.tp_group, vocab_size=vocab,
                                        padded_vocab_size=vocab)
    theirs = mtp.vocab_parallel_cross_entropy(b, target)
    assert_close(ours, theirs, **TOL)
    up = _data(S, B, seed=14)
    (ours * up).sum().backward()
    (theirs * up).sum().backward()
    assert_close(a.grad, b.grad, **TOL)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MCORE, reason="megatron-core is not installed "
                    "(pip install megatron-core); it is the reference for these layers")
def test_layers_match_megatron_core():
    assert run_distributed(_check_vs_megatron, 2, timeout_s=240) == ["ok"] * 2
