"""tools/estimate_memory.py against the real model: parameter counts (every TP shard), FLOPs, and
the peak memory of real CPU training steps (each in a fresh process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # also when run as a script (measurement)

from conftest import SHARED_DATA  # noqa: E402
from megapre.model.config import TransformerConfig  # noqa: E402
from megapre.cli.estimate_memory import main  # noqa: E402
from megapre.cli.flags import parse_config  # noqa: E402
from megapre.launch.memory import (estimate, layer_params, logit_rows, stage_params,  # noqa: E402
                                   total_params)
from megapre.train.metrics import flops_per_token  # noqa: E402

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8"]
VARIANTS = {
    "gpt": [],
    "gpt-untied-rope-rms": ["--untie-embeddings-and-output-weights", "--position-embedding-type",
                            "rope", "--normalization", "RMSNorm"],
    "gpt-swiglu-gqa-nobias": ["--swiglu", "--num-query-groups", "2", "--disable-bias-linear"],
    "bert": ["--model", "bert"],
    "bert-nobinary": ["--model", "bert", "--no-bert-binary-head"],
    "gpt-shared-factorized": ["--share-layers-every", "2", "--embedding-size", "16"],
    "gpt-untied-factorized-all-shared": ["--untie-embeddings-and-output-weights",
                                         "--embedding-size", "16", "--share-layers-every", "4"],
    "bert-shared-factorized": ["--model", "bert", "--share-layers-every", "4",
                               "--embedding-size", "16"],
}


def _real_params(kind: str, mc: TransformerConfig, binary: bool) -> int:
    from megapre.parallel.mesh import ParallelMesh
    from megapre.train.parallel_model import ParallelModel

    model = ParallelModel.build(kind, mc, ParallelMesh.single(device="cpu"),
                                add_binary_head=binary)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_counts_match_real_model(name):
    cfg = parse_config(BASE + VARIANTS[name])
    kind = cfg.model.model
    binary = kind == "bert" and cfg.model.bert_binary_head
    mc = cfg.transformer_config(1000)  # padded to 1024
    total, non_emb = total_params(mc, kind, binary)
    assert total == _real_params(kind, mc, binary)
    e, h = mc.embedding_dim, mc.hidden_size  # tables of width --embedding-size (else hidden)
    emb = mc.padded_vocab_size(1) * (e + (h if mc.untie_embeddings_and_output_weights else 0))
    emb += mc.max_position_embeddings * e \
        if mc.position_embedding_type == "learned_absolute" else 0
    emb += 2 * e if kind == "bert" else 0
    emb += e * h + h if mc.factorized_embedding else 0  # the up-projection
    assert non_emb == total - emb
    est = estimate(cfg, 1, 1000)
    assert est.stages[0].params == total and est.stages[0].weights == 4 * total
    assert est.stages[0].optimizer == 8 * total


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", ["gpt", "gpt-swiglu-gqa-nobias", "bert", "gpt-shared-factorized",
                                  "bert-shared-factorized"])
def test_tp_shards_sum_to_the_full_model(name, tp):
    """Each TP rank's analytic share, summed over ranks, is the single-process model plus
    the replicated tensors counted tp times and the extra vocabulary padding of this TP."""
    from megapre.parallel.mesh import ParallelMesh
    from megapre.train.parallel_model import ParallelModel

    cfg = parse_config(BASE + VARIANTS[name])
    kind = cfg.model.model
    mc = cfg.transformer_config(1000)
    mc_pad = cfg.transformer_config(mc.padded_vocab_size(tp))  # the TP layout's vocab rows
    model = ParallelModel.build(kind, mc_pad, ParallelMesh.single(device="cpu"))
    sharded = replicated = 0
    for p in model.parameters():  # the layers mark what they split over TP
        if getattr(p, "tensor_parallel_dim", None) is not None:
            sharded += p.numel()
        else:
            replicated += p.numel()
    per_rank = stage_params(mc, kind, tp, 1, 0)
    assert per_rank * tp == sharded + tp * replicated
    assert mc.padded_vocab_size(tp) % (128 * tp) == 0


def test_pipeline_stages_split_layers_and_ends():
    cfg = parse_config(BASE + ["--pipeline-model-parallel-size", "2"])
    mc = cfg.transformer_config(1000)
    first, last = stage_params(mc, "gpt", 1, 2, 0), stage_params(mc, "gpt", 1, 2, 1)
    total, _ = total_params(mc, "gpt")
    word = mc.padded_vocab_size(1) * mc.hidden_size
    assert first + last == total + word  # the last stage keeps a copy of the tied word table
    assert first - 2 * layer_params(mc) == mc.padded_vocab_size(1) * 64 + 32 * 64


def test_flops_are_flops_per_token_times_tokens():
    cfg = parse_config(BASE + ["--swiglu", "--num-query-groups", "2",
                               "--tensor-model-parallel-size", "2"])
    est = estimate(cfg, 4, 1000)
    mc = cfg.transformer_config(1000)
    assert est.flops_per_step == flops_per_token(mc, 32) * 8 * 32
    assert est.flops_per_rank_per_step == est.flops_per_step / 4
    assert est.dp == 2 and est.num_microbatches == 2


def test_in_flight_microbatches_follow_the_schedule():
    def flight(extra):
        cfg = parse_config(BASE + ["--pipeline-model-parallel-size", "2",
                                   "--global-batch-size", "16"] + extra)
        return [st.in_flight_microbatches for st in estimate(cfg, 2, 1000).stages]
    assert flight([]) == [2.0, 1.0]
    assert flight(["--pipeline-schedule", "gpipe"]) == [8.0, 8.0]
    cfg = parse_config(BASE)
    assert estimate(cfg, 1, 1000).stages[0].in_flight_microbatches == 1.0


def test_recompute_orders_activation_memory():
    cfg = parse_config(BASE + ["--attention-backend", "unfused"])
    st = estimate(cfg, 1, 1000).stages[0]
    assert st.activations_full_recompute < st.activations_selective_recompute < st.activations
    sdpa = estimate(parse_config(BASE + ["--attention-backend", "sdpa"]), 1, 1000).stages[0]
    assert sdpa.activations < st.activations  # no s x s probabilities kept


def test_cli_prints_report_and_rejects_bad_input(capsys):
    assert main(BASE + ["--world-size", "2", "--vocab-size", "1000",
                        "--tensor-model-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "non-embedding" in out and "AdamW state" in out and "FLOPs" in out
    assert main(BASE + ["--world-size", "3", "--vocab-size", "1000",
                        "--tensor-model-parallel-size", "2"]) == 2
    assert "world size 3" in capsys.readouterr().err
    assert main(BASE) == 2  # no vocabulary
    assert "--vocab-size" in capsys.readouterr().err
    assert main(["--config", "/nonexistent/run.yaml", "--vocab-size", "10"]) == 2
    assert "/nonexistent/run.yaml" in capsys.readouterr().err
    assert main(BASE + ["--vocab-size", "10", "--world-size", "0"]) == 2
    assert "--world-size=0" in capsys.readouterr().err
    assert main(BASE) == 2
    assert "--vocab-size" in capsys.readouterr().err
    assert main(BASE + ["--vocab-size", "1000", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] > data["stages"][0]["weights"]


def test_tokenizer_flags_give_the_vocabulary(capsys):
    data = SHARED_DATA / "gpt2"
    if not (data / "vocab.json").exists():
        pytest.skip(f"GPT-2 vocabulary not found at {data}")
    assert main(BASE + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                        str(data / "vocab.json"), "--merge-file", str(data / "merges.txt"),
                        "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["padded_vocab_size"] == 50304


# -- the per-layer activation formula against what autograd really keeps -------------------

LAYER_CASES = {
    "gelu-dropout": {},
    "gelu-nodropout": {"hidden_dropout": 0.0, "attention_dropout": 0.0},
    "swiglu-gqa-rms": {"activation": "swiglu", "num_query_groups": 2, "normalization": "RMSNorm",
                       "add_bias_linear": False, "hidden_dropout": 0.0, "attention_dropout": 0.0},
    "rope-mha": {"position_embedding_type": "rope", "hidden_dropout": 0.0,
                 "attention_dropout": 0.0},
    "rope-gqa-dropout": {"position_embedding_type": "rope", "num_query_groups": 2},
    "sdpa": {"attention_backend": "sdpa", "hidden_dropout": 0.0, "attention_dropout": 0.0},
    "fused-nodropout": {"attention_backend": "fused", "hidden_dropout": 0.0,
                        "attention_dropout": 0.0},
    "auto-dropout": {"attention_backend": "auto"},
    "swiglu-nobias-dropout": {"activation": "swiglu", "add_bias_linear": False},
}


def _saved_bytes(cfg: TransformerConfig, b: int, dtype, recompute: str | None,
                 ring: bool = False) -> int:
    """Bytes of the distinct storages autograd saves for one layer's backward (no weights);
    `ring`: attention as context parallelism's ring (a ring of one saves what a rank of a
    longer ring saves for its share of the sequence)."""
    import torch

    from megapre.model.transformer import TransformerStack
    from megapre.parallel.context import ContextGroup
    from megapre.parallel.mesh import ParallelMesh
    from megapre.model.rope import rope_frequencies

    stack = TransformerStack(cfg, ParallelMesh.single(device="cpu"), 0, 1, 1, None, recompute,
                             prefix="decoder")
    if ring:
        for layer in stack.layers.values():
            layer.attention.core.context = ContextGroup.single()
    stack.train()
    params = {p.untyped_storage().data_ptr() for p in stack.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t
    x = torch.randn(cfg.seq_length, b, cfg.hidden_size, requires_grad=True)
    rope = rope_frequencies(torch.arange(cfg.seq_length), cfg.head_dim, cfg.rotary_base) \
        if cfg.position_embedding_type == "rope" else None
    cast = torch.autocast("cpu", dtype=dtype) if dtype is not None else \
        torch.autocast("cpu", enabled=False)
    with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stack(x, None, causal=True, rope=rope)
    cached = 0
    if dtype is not None:  # autocast's weight copies: accounted as the weight cache
        cached = sum(p.numel() * 2 for p in stack.parameters() if p.dim() == 2)
    return sum(seen.values()) - cached


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_activation_formula_matches_autograd(name, half):
    import torch

    from megapre.launch.memory import _Shape, attention_backend, layer_activation_bytes

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=256,
                            seq_length=32, max_position_embeddings=32, **LAYER_CASES[name])
    e = 2 if half else 4
    sh = _Shape(32, 2, 1, False, e, e, 4 if cfg.add_bias_linear else e)
    dtype = torch.bfloat16 if half else None
    assert layer_activation_bytes(cfg, sh) == _saved_bytes(cfg, 2, dtype, None)
    if attention_backend(cfg, "cpu") == "fused":
        # selective: the recompute keeps the core's inputs and output, not the s^2 terms
        assert layer_activation_bytes(cfg, sh, selective=True) == \
            _saved_bytes(cfg, 2, dtype, "selective")


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("name", ["gelu-nodropout", "swiglu-gqa-rms", "rope-mha"])
def test_ring_attention_layer_formula_matches_autograd(name, half):
    """Context parallelism's layer: what the ring attention saves (inputs, log-sum-exp, its
    output shared with the context) for this rank's share of the sequence."""
    import torch

    from megapre.launch.memory import _Shape, layer_activation_bytes

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=256,
                            seq_length=32, max_position_embeddings=32, **LAYER_CASES[name])
    e = 2 if half else 4
    sh = _Shape(32, 2, 1, False, e, e, 4 if cfg.add_bias_linear else e)  # 32 local tokens
    dtype = torch.bfloat16 if half else None
    assert layer_activation_bytes(cfg, sh, cp=2) == _saved_bytes(cfg, 2, dtype, None, ring=True)


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_divides_activations(cp, capsys):
    """Each CP rank holds 1/CP of every sequence: the activation terms (all recompute modes)
    are exactly 1/CP of the CP-free run's (multi-head attention, where the ring keeps what
    sdpa keeps); weights and optimizer state are replicated, unchanged."""
    flags = BASE + ["--attention-dropout", "0", "--vocab-size", "1000"]
    one = estimate(parse_config(flags), 2, 1000).stages[0]
    est = estimate(parse_config(flags + ["--context-parallel-size", str(cp)]), 2 * cp, 1000)
    st = est.stages[0]
    assert est.cp == cp and est.attention_backend == "ring" and est.dp == 2
    for name in ("activations", "activations_full_recompute", "activations_selective_recompute",
                 "activations_per_microbatch"):
        assert getattr(st, name) * cp == getattr(one, name), name
    assert (st.weights, st.grads, st.optimizer) == (one.weights, one.grads, one.optimizer)
    assert main(flags + ["--context-parallel-size", str(cp), "--world-size", str(2 * cp)]) == 0
    assert f"TP 1 x CP {cp} x PP 1 x DP 2" in capsys.readouterr().out
    assert main(flags + ["--context-parallel-size", "3", "--world-size", "6"]) == 2
    assert "--context-parallel-size 3 needs --seq-length 32 divisible by 2 x 3" in \
        capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--hidden-dropout", "0"], ["--model", "bert"],
                                   ["--model", "bert", "--attention-dropout", "0"],
                                   ["--share-layers-every", "2", "--embedding-size", "16"],
                                   ["--model", "bert", "--embedding-size", "16"]])
def test_whole_model_activations_match_autograd(extra):
    """Layers + embedding + head (final norm, logits' softmax, BERT's LM head) of one
    micro-batch against every storage autograd saves; only the ids/mask bookkeeping differs."""
    import torch

    from megapre.parallel.mesh import ParallelMesh
    from megapre.train.parallel_model import ParallelModel

    cfg = parse_config(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                        "--seq-length", "32", "--micro-batch-size", "2", "--device", "cpu"]
                       + extra)
    mc = cfg.transformer_config(1000)
    kind = cfg.model.model
    model = ParallelModel.build(kind, mc, ParallelMesh.single(device="cpu"))
    chunk = model.chunks[0].train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    rows = logit_rows(kind, 32, 2, cfg.data.mask_prob)  # BERT: the masking budget's maximum
    labels = ids.clone()
    if kind == "bert":  # predicted at the first rows/2 positions of each sample, -1 elsewhere
        labels[:, rows // 2:] = -1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if kind == "gpt":
            chunk(ids, labels=labels)
        else:
            chunk(ids, types=torch.zeros_like(ids), padding_mask=torch.ones_like(ids),
                  labels=labels)
    live_logits = 4 * rows * mc.padded_vocab_size(1)  # alive at the peak, not saved
    est = estimate(cfg, 1, 1000).stages[0].activations_per_microbatch - live_logits
    assert est == pytest.approx(sum(seen.values()), rel=0.01)


# -- measured peak memory of real CPU steps -------------------------------------------------

MEASURE = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
           "--seq-length", "256", "--micro-batch-size", "8", "--global-batch-size", "8",
           "--hidden-dropout", "0", "--attention-dropout", "0", "--device", "cpu"]
VOCAB = 8000
CASES = {
    "gelu": [],
    "gelu-full-recompute": ["--recompute-granularity", "full"],
    "gelu-bf16-dropout": ["--bf16", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"],
    "swiglu-gqa": ["--swiglu", "--num-query-groups", "2", "--disable-bias-linear",
                   "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                   "--attention-dropout", "0.1", "--hidden-dropout", "0.1"],
}


def _native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(argv: list[str]) -> None:
    """One measurement: RSS before the model, then the high-water mark over the second step
    (optimizer state exists, as in every later step)."""
    import torch

    from megapre.parallel.mesh import ParallelMesh
    from megapre.train.optim import build_optimizer
    from megapre.train.parallel_model import ParallelModel
    from megapre.train.step import StepConfig, TrainStep

    torch.set_num_threads(1)
    cfg = parse_config(argv)
    mc = cfg.transformer_config(VOCAB)
    t = cfg.train
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (t.micro_batch_size, mc.seq_length + 1), generator=g)
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
             "loss_mask": torch.ones(t.micro_batch_size, mc.seq_length)}
    base = _vm("VmRSS")
    model = ParallelModel.build("gpt", mc, ParallelMesh.single(device="cpu"),
                                recompute_granularity=t.recompute_granularity)
    opt = build_optimizer(model, 1e-4, 0.01)
    step = TrainStep(model, opt, StepConfig(t.micro_batch_size, t.global_batch_size))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.bf16)
    with autocast:
        step(iter([batch]))
    states = sum(p.numel() * p.element_size() for p in model.parameters())
    states += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states += sum(v.numel() * v.element_size() for s in opt.state.values()
                  for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak of the next step alone
    with autocast:
        step(iter([batch]))
    print(json.dumps({"peak": _vm("VmHWM") - base, "states": states}))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_estimate_within_15_percent_of_measured_peak(case):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the process's peak RSS")
    if "--bf16" in CASES[case] and not _native_bf16():
        pytest.skip("this CPU has no AVX512_BF16/AMX: torch emulates bf16 GEMMs (minutes per step, "
                    "with fp32 conversion buffers the estimate does not model)")
    argv = MEASURE + CASES[case]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1",  # big tensors are mmapped and returned on free
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run([sys.executable, __file__, json.dumps(argv)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    est = estimate(parse_config(argv), 1, VOCAB)
    st = est.stages[0]
    assert st.weights + st.grads + st.optimizer == measured["states"]
    ratio = est.peak_bytes() / measured["peak"]
    print(case, "estimated", est.peak_bytes(), "measured", measured["peak"], "ratio", ratio)
    assert 0.85 <= ratio <= 1.15, (case, est.peak_bytes(), measured)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))


GPT3_175B = ["--num-layers", "96", "--hidden-size", "12288", "--num-attention-heads", "96",
             "--seq-length", "2048", "--micro-batch-size", "1", "--global-batch-size", "1536",
             "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "16",
             "--bf16", "--sequence-parallel", "--recompute-granularity", "selective"]


def test_distributed_optimizer_on_175b_over_1024_gpus(capsys):
    """GPT-3 175B on 1024 GPUs (TP8 x PP16 x DP8): --use-distributed-optimizer cuts each rank's
    AdamW state to 1/8 (10.9 -> 1.36 GiB on the first stage), the peak by the difference, and
    the report says so with and without the flag."""
    plain = estimate(parse_config(GPT3_175B), 1024, 50257)
    sharded = estimate(parse_config(GPT3_175B + ["--use-distributed-optimizer"]), 1024, 50257)
    assert plain.dp == 8 and sharded.distributed_optimizer
    for a, b in zip(plain.stages, sharded.stages):
        assert b.optimizer == 8 * -(-a.params // 8) and a.optimizer == 8 * a.params
        assert (a.weights, a.grads) == (b.weights, b.grads)  # fp32 master weights stay whole
    saved = plain.stages[0].optimizer - sharded.stages[0].optimizer
    assert plain.peak_bytes() - sharded.peak_bytes() == saved
    assert 9.5 * 2**30 < saved < 9.6 * 2**30
    assert main(GPT3_175B + ["--world-size", "1024", "--vocab-size", "50257"]) == 0
    out = capsys.readouterr().out
    assert "with --use-distributed-optimizer: AdamW state 1.363 GiB per rank instead of " \
           "10.902 GiB; peak 33.504 GiB instead of 43.044 GiB" in out
    assert main(GPT3_175B + ["--world-size", "1024", "--vocab-size", "50257",
                             "--use-distributed-optimizer"]) == 0
    out = capsys.readouterr().out
    assert "1.363 GiB (1/8: distributed optimizer)" in out and "peak    33.504 GiB" in out
