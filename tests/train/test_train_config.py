"""The pretraining config (Megatron flags, YAML/JSON file, validator) and the optimizer pieces."""
from __future__ import annotations

import json
import math

import pytest
import torch

from megapre.model.config import ConfigError
from megapre.model.gpt import GPTModel
from megapre.parallel import ParallelMesh
from megapre.cli.flags import parse_config
from megapre.train.args import from_dict, validate
from megapre.train.optim import LRSchedule, build_optimizer, param_groups

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--data-path", "A"]


def test_flags_map_to_sections_and_round_trip():
    cfg = parse_config(BASE + ["--bf16", "--data-path", "0.3", "A", "0.7", "B", "--lr", "1e-3",
                               "--no-bert-binary-head", "--recompute-granularity", "selective",
                               "--tensor-model-parallel-size", "2", "--swiglu"])
    assert cfg.train.bf16 and cfg.optim.lr == 1e-3 and cfg.model.swiglu
    assert cfg.data.data_path == ["0.3", "A", "0.7", "B"]
    assert cfg.model.bert_binary_head is False
    assert cfg.train.recompute_granularity == "selective"
    again = from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    tc = cfg.transformer_config(vocab_size=1000)
    assert tc.activation == "swiglu" and tc.max_position_embeddings == 32


def test_post_layernorm_and_erf_gelu_flags_reach_the_model():
    cfg = parse_config(BASE + ["--model", "bert", "--post-layernorm", "--erf-gelu"])
    tc = cfg.transformer_config(vocab_size=1000)
    assert tc.post_layernorm and tc.activation == "gelu_erf"
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # saved with checkpoints
    with pytest.raises(ConfigError, match="--swiglu and --erf-gelu exclude each other"):
        validate(parse_config(BASE + ["--erf-gelu", "--swiglu"]), world_size=1)


def test_config_file_then_flags_override(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"num-layers": 6, "hidden_size": 96}, "lr": 0.5,
                                "micro_batch_size": 3}))
    cfg = parse_config(["--config", str(path), "--lr", "0.25"] + BASE[4:])
    assert cfg.model.num_layers == 6 and cfg.model.hidden_size == 96
    assert cfg.optim.lr == 0.25 and cfg.train.micro_batch_size == 3
    path.write_text(json.dumps({"num_layer": 3}))
    with pytest.raises(ConfigError, match="unknown setting 'num_layer'"):
        parse_config(["--config", str(path)])


def test_bad_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--normalization", "BatchNorm"])
    assert "--normalization" in capsys.readouterr().err


@pytest.mark.parametrize("extra,world,match", [
    (["--tensor-model-parallel-size", "3"], 6, "--num-attention-heads"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6"),
    (["--bf16", "--fp16"], 1, "exclusive"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4"),
    (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr"),
    (["--lr-decay-style", "WSD"], 1, "--lr-wsd-decay-iters"),
    (["--save-interval", "10"], 1, "--save DIR"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "4", "--seq-length", "30"], 4,
     "--sequence-parallel"),
])
def test_validator_names_the_flag(extra, world, match):
    cfg = parse_config(BASE + extra)
    with pytest.raises(ConfigError, match=match.replace("-", r"\-")):
        validate(cfg, world)


def test_validator_fills_global_batch_and_returns_dp():
    cfg = parse_config(BASE + ["--micro-batch-size", "2", "--tensor-model-parallel-size", "2"])
    plan = validate(cfg, 8)
    assert plan.dp_size == 4
    assert plan.config.train.global_batch_size == 8 == plan.global_batch_size
    assert cfg.train.global_batch_size is None  # the caller's config is left as it was


def test_no_data_is_an_error():
    cfg = parse_config(BASE[:-2])
    with pytest.raises(ConfigError, match="--data-path"):
        validate(cfg, 1)


def test_schedules():
    cos = LRSchedule(1.0, 0.1, warmup=10, decay_iters=110, style="cosine")
    # Megatron's warmup: the update of iteration k uses lr * k / warmup, so the first is 0
    assert cos(0) == 0.0 and cos(9) == pytest.approx(0.9) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(500) == 0.1
    lin = LRSchedule(1.0, 0.0, warmup=0, decay_iters=100, style="linear")
    assert lin(25) == pytest.approx(0.75)
    wsd = LRSchedule(1.0, 0.0, warmup=5, decay_iters=100, style="WSD", wsd_decay_iters=20)
    assert wsd(50) == 1.0 and wsd(80) == 1.0 and wsd(90) == pytest.approx(0.5)
    assert LRSchedule(1.0, 0.0, 0, 10, "constant")(1000) == 1.0
    isr = LRSchedule(1.0, 0.0, 4, 100, "inverse-square-root")
    assert isr(16) == pytest.approx(math.sqrt(4 / 16))


class _FakeOptimizer:
    """What megatron-core's scheduler touches: param_groups with lr / weight_decay."""

    def __init__(self):
        self.param_groups = [{"params": [], "lr": 0.0, "weight_decay": 0.0}]


@pytest.mark.parametrize("style,warmup,decay,wsd", [
    ("linear", 10, 100, None), ("cosine", 7, 53, None), ("constant", 5, 40, None),
    ("inverse-square-root", 8, 60, None), ("cosine", 0, 30, None),
    ("WSD", 4, 50, ("linear", 20)), ("WSD", 4, 50, ("cosine", 13)),
    ("WSD", 4, 50, ("exponential", 10)), ("WSD", 4, 50, ("minus_sqrt", 10))])
def test_schedule_equals_megatron_core(style, warmup, decay, wsd):
    """Every iteration's lr equals megatron-core's OptimizerParamScheduler (steps counted in
    samples, global batch 8, stepped once per iteration after the update as Megatron's loop
    does)."""
    sched_mod = pytest.importorskip("megatron.core.optimizer_param_scheduler",
                                    reason="megatron-core is in requirements-dev.txt")
    gbs, lr, min_lr = 8, 3e-4, 3e-5
    wsd_style, wsd_iters = wsd or ("linear", 0)
    ref = sched_mod.OptimizerParamScheduler(
        _FakeOptimizer(), init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup * gbs,
        lr_decay_steps=decay * gbs, lr_decay_style=style, start_wd=0.1, end_wd=0.1,
        wd_incr_steps=decay * gbs, wd_incr_style="constant",
        wsd_decay_steps=wsd_iters * gbs if wsd else None, lr_wsd_decay_style=wsd_style)
    ours = LRSchedule(lr, min_lr, warmup, decay, style, wsd_iters, wsd_style)
    for it in range(decay + 10):
        assert ours(it) == pytest.approx(ref.get_lr(ref.optimizer.param_groups[0]), rel=1e-12,
                                         abs=1e-15), it
        ref.step(increment=gbs)


def test_sample_based_schedule_equals_megatron_core():
    """--train-samples / --lr-warmup-samples / --lr-decay-samples: warmup and decay lengths that
    are not whole iterations, as Megatron counts them."""
    sched_mod = pytest.importorskip("megatron.core.optimizer_param_scheduler",
                                    reason="megatron-core is in requirements-dev.txt")
    from megapre.train.args import OptimArgs
    from megapre.train.optim import schedule_from_args

    gbs = 12
    o = OptimArgs(lr=1e-3, min_lr=1e-4, lr_decay_style="cosine", lr_warmup_samples=100,
                  lr_decay_samples=1000)
    ours = schedule_from_args(o, train_iters=100, global_batch_size=gbs, sample_based=True)
    ref = sched_mod.OptimizerParamScheduler(
        _FakeOptimizer(), init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=100,
        lr_decay_steps=1000, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
        wd_incr_steps=1000, wd_incr_style="constant")
    for it in range(100):
        assert ours(it) == pytest.approx(ref.get_lr(ref.optimizer.param_groups[0]), rel=1e-12), it
        ref.step(increment=gbs)


def test_no_weight_decay_on_biases_and_norms():
    from megapre.model.config import TransformerConfig
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=50,
                            seq_length=8, max_position_embeddings=8)
    model = GPTModel(cfg, ParallelMesh.single(device="cpu"))
    groups = param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2 and "norm" not in name), name
    opt = build_optimizer(model, 1e-3, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_every_data_flag_reaches_the_data_layer():
    """The cache and blend flags (one declaration, DataArgs) are pretraining flags too, and the
    blend / cache configs the run builds its datasets from carry them."""
    cfg = parse_config(BASE + ["--megatron-compatible-blend", "--no-data-cache",
                               "--data-cache-node-local", "--data-cache-wait", "5",
                               "--data-cache-path", "/tmp/c"])
    blend, cache = cfg.data.blend(), cfg.data.cache()
    assert blend.megatron_compatible_blend and blend.data_path == ["A"]
    assert (cache.cache_dir, cache.enabled, cache.node_local, cache.wait_timeout_s) == \
        ("/tmp/c", False, True, 5.0)
    default = parse_config(BASE).data.cache()
    assert default.enabled and not default.node_local and not parse_config(BASE).data.blend() \
        .megatron_compatible_blend


def test_decoupled_lr_groups_follow_their_own_bounds():
    """--decoupled-lr / --decoupled-min-lr: the word embedding and output layer get the
    schedule's shape between their own bounds; every other group the main one."""
    from megapre.model.config import TransformerConfig
    from megapre.train.optim import set_lr

    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=50,
                            seq_length=8, max_position_embeddings=8,
                            untie_embeddings_and_output_weights=True)
    model = GPTModel(cfg, ParallelMesh.single(device="cpu"))
    opt = build_optimizer(model, 1e-3, 0.1, decoupled=(5e-3, 5e-4))
    outer = [g for g in opt.param_groups if "max_lr" in g]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for g in outer for p in g["params"]) == [
        "embedding.word.weight", "output_layer.weight"]
    schedule = LRSchedule(1e-3, 1e-4, warmup=2, decay_iters=10, style="cosine")
    for it in (0, 1, 5, 12):
        set_lr(opt, schedule(it), schedule, it)
        for g in opt.param_groups:
            want = (LRSchedule(5e-3, 5e-4, 2, 10, "cosine")(it) if "max_lr" in g
                    else schedule(it))
            assert g["lr"] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ConfigError, match="--decoupled-min-lr needs --decoupled-lr"):
        validate(parse_config(BASE + ["--decoupled-min-lr", "1e-5"]), 1)


@pytest.mark.parametrize("extra,match", [
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--use-distributed-optimizer", "--ddp-bucket-size", "0"], "--ddp-bucket-size"),
])
def test_distributed_optimizer_flags_are_checked(extra, match):
    with pytest.raises(ConfigError, match=match.replace("-", r"\-")):
        validate(parse_config(BASE + extra), 2)
    plan = validate(parse_config(BASE + ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                         "--overlap-param-gather", "--ddp-bucket-size", "1000"]), 2)
    p = plan.config.parallel
    assert (p.use_distributed_optimizer, p.overlap_grad_reduce, p.overlap_param_gather,
            p.ddp_bucket_size) == (True, True, True, 1000)
