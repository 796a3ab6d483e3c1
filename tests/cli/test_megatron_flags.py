"""Megatron launch lines on megapre's parser: Megatron's meanings, no-ops with one note,
refusals in one line, Megatron's YAML through --config, and configs saved by older megapre."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megapre.cli import megatron_flags
from megapre.cli.megatron_flag_names import MEGATRON_FLAGS
from megapre.cli.flags import build_parser, parse_config
from megapre.errors import ConfigError
from megapre.train.args import from_dict, validate

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--data-path", "A"]
README = Path(__file__).resolve().parents[2] / "README.md"


def test_abbreviations_are_refused():
    """argparse's prefix matching once read --loss-scale 1024 as --loss-scale-window; now
    --loss-scale is Megatron's fixed loss scale and prefixes are refused."""
    cfg = parse_config(BASE + ["--loss-scale", "1024"])
    assert cfg.train.loss_scale == 1024 and cfg.train.loss_scale_window == 1000
    for abbreviated in (["--loss-scale-win", "5"], ["--micro-batch", "2"], ["--hidden", "64"]):
        with pytest.raises(SystemExit):
            parse_config(BASE + abbreviated)


def test_noop_flags_are_listed_in_one_note():
    notes: list[str] = []
    cfg = parse_config(BASE + ["--use-mcore-models", "--transformer-impl", "transformer_engine",
                               "--distributed-backend", "nccl", "--no-gradient-accumulation-fusion",
                               "--timing-log-level", "0", "--ckpt-format", "torch_dist"],
                       notes=notes)
    assert cfg.model.num_layers == 4
    [note] = [n for n in notes if "no-ops" in n]
    for flag in ("--use-mcore-models", "--transformer-impl", "--distributed-backend",
                 "--no-gradient-accumulation-fusion", "--timing-log-level", "--ckpt-format"):
        assert flag in note


@pytest.mark.parametrize("extra,flag", [
    (["--num-experts", "8"], "--num-experts"), (["--moe-router-topk", "2"], "--moe-router-topk"),
    (["--fp8-format", "hybrid"], "--fp8-format"), (["--multi-latent-attention"], "--multi-latent-attention"),
    (["--transformer-impl", "inference_optimized"], "--transformer-impl"),
    (["--ckpt-format", "fsdp_dtensor"], "--ckpt-format")])
def test_missing_features_are_refused_by_name(extra, flag):
    with pytest.raises(ConfigError, match=f"^{flag}"):
        parse_config(BASE + extra)


def test_cli_refusal_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megapre.pretrain", *BASE, "--fp8-format",
                           "hybrid"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--fp8-format" in lines[0] and "not supported" in lines[0]
    assert "Traceback" not in proc.stderr


def test_megatron_spellings():
    cfg = parse_config(BASE + ["--bert-no-binary-head", "--use-rotary-position-embeddings",
                               "--recompute-activations", "--split", "'99,1,0'",
                               "--attention-softmax-in-fp32", "--calculate-per-token-loss"])
    assert cfg.model.bert_binary_head is False
    assert cfg.model.position_embedding_type == "rope"
    assert cfg.train.recompute_granularity == "selective"
    from megapre.data.split import parse_split
    assert parse_split(cfg.data.split) == pytest.approx((0.99, 0.01, 0.0))


def test_group_query_attention_needs_the_switch():
    """As in Megatron: --num-query-groups alone keeps full multi-head attention."""
    alone = parse_config(BASE + ["--num-query-groups", "2"])
    assert alone.transformer_config(100).num_query_groups == 4
    gqa = parse_config(BASE + ["--group-query-attention", "--num-query-groups", "2"])
    assert gqa.transformer_config(100).num_query_groups == 2
    with pytest.raises(ConfigError, match="--num-query-groups"):
        validate(parse_config(BASE + ["--group-query-attention"]), 1)


@pytest.mark.parametrize("value,model", [("flash", "sdpa-flash"), ("fused", "sdpa-efficient"),
                                         ("unfused", "fused"), ("local", "fused"),
                                         ("sdpa", "sdpa"), ("auto", "auto")])
def test_attention_backend_megatron_values(value, model):
    cfg = parse_config(BASE + ["--attention-backend", value])
    assert cfg.transformer_config(100).attention_backend == model


def test_old_saved_config_keeps_its_meaning():
    """A config saved before version 2: 'fused' was megapre's softmax kernel, num_query_groups
    alone meant GQA, SwiGLU's default width was 8h/3 rounded up to 256."""
    cfg = parse_config(BASE + ["--attention-backend", "unfused", "--swiglu"])
    old = json.loads(json.dumps(cfg.to_dict()))
    old.pop("config_version")
    old["model"].update(attention_backend="fused", num_query_groups=2)
    old["model"].pop("group_query_attention")
    loaded = from_dict(old)
    tc = loaded.transformer_config(100)
    assert tc.attention_backend == "fused" and tc.num_query_groups == 2
    assert tc.ffn_hidden_size == 256  # ceil(8*64/3/256)*256; Megatron's rule would give 128
    new = from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert new == cfg and new.transformer_config(100).ffn_hidden_size == 128


@pytest.mark.parametrize("flag,value", [("--num-layers-per-virtual-pipeline-stage", "1"),
                                        ("--num-virtual-stages-per-pipeline-rank", "2")])
def test_virtual_pipeline_flags_select_interleaving(flag, value):
    cfg = parse_config(BASE + ["--pipeline-model-parallel-size", "2", "--global-batch-size", "8",
                               "--micro-batch-size", "1", flag, value])
    plan = validate(cfg, 2)
    assert plan.virtual_pipeline == 2 and plan.pipeline_schedule == "interleaved-1f1b"


def test_megatron_defaults():
    cfg = parse_config(BASE)
    plan = validate(cfg, 1)
    assert cfg.optim.lr_decay_style == "linear" and cfg.train.initial_loss_scale == 2.0 ** 32
    assert cfg.train.eval_iters == 100 and plan.config.train.train_iters == 1000


def test_train_samples_sets_iterations():
    cfg = parse_config(BASE + ["--train-samples", "1000", "--global-batch-size", "16",
                               "--micro-batch-size", "4", "--lr-warmup-samples", "40"])
    assert validate(cfg, 1).config.train.train_iters == 62
    with pytest.raises(ConfigError, match="--train-iters or --train-samples"):
        validate(parse_config(BASE + ["--train-samples", "100", "--train-iters", "5"]), 1)
    with pytest.raises(ConfigError, match="--lr-warmup-samples"):
        validate(parse_config(BASE + ["--train-iters", "5", "--lr-warmup-samples", "3"]), 1)


def test_vocab_size_is_ignored_with_a_note_when_the_tokenizer_knows_it():
    notes: list[str] = []
    cfg = parse_config(BASE + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-size", "128256"],
                       notes=notes)
    assert cfg.data.vocab_size is None and any("--vocab-size 128256 ignored" in n for n in notes)
    kept = parse_config(BASE + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"])
    assert kept.data.vocab_size == 100


def test_megatron_yaml_config_with_environment(tmp_path, monkeypatch):
    path = tmp_path / "model_config.yaml"
    path.write_text("ENV_VARS:\n  CUDA_DEVICE_MAX_CONNECTIONS: 1\nMODEL_ARGS:\n"
                    "  --num-layers: 4\n  --hidden-size: 64\n  --num-attention-heads: 4\n"
                    "  --seq-length: 32\n  --max-position-embeddings: 32\n"
                    "  --data-path: $DATA_BLEND\n  --save: ${CHECKPOINT_SAVE_PATH}/x\n"
                    "  --bf16: true\n  --fp16: false\n  --split: 949,50,1\n"
                    "  --use-mcore-models: true\n  --lr: 0.0001\nTEST_TYPE: regular\n")
    monkeypatch.setenv("DATA_BLEND", "0.3 /d/a 0.7 /d/b")
    monkeypatch.setenv("CHECKPOINT_SAVE_PATH", "/ckpt")
    notes: list[str] = []
    cfg = parse_config(["--config", str(path), "--lr", "0.5"], notes=notes)
    assert cfg.data.data_path == ["0.3", "/d/a", "0.7", "/d/b"]
    assert cfg.checkpoint.save == "/ckpt/x" and cfg.train.bf16 and not cfg.train.fp16
    assert cfg.optim.lr == 0.5  # the command line overrides the file
    assert any("ENV_VARS" in n for n in notes) and any("--use-mcore-models" in n for n in notes)
    monkeypatch.delenv("DATA_BLEND")
    with pytest.raises(ConfigError, match=r"--data-path uses \$\{DATA_BLEND\}"):
        parse_config(["--config", str(path)])


def test_use_checkpoint_args(tmp_path):
    """The architecture comes from --load's checkpoint; dropout and the like stay the command
    line's; an empty --load says so and keeps the command line's model."""
    from inference.tiny_checkpoints import counting_checkpoint

    with pytest.raises(ConfigError, match="--use-checkpoint-args needs --load"):
        parse_config(BASE + ["--use-checkpoint-args"])
    notes: list[str] = []
    parse_config(BASE + ["--use-checkpoint-args", "--load", str(tmp_path / "none")], notes=notes)
    assert any("no checkpoint" in n for n in notes)
    ckpt = counting_checkpoint(tmp_path, iters=2)
    notes = []
    cfg = parse_config(BASE + ["--use-checkpoint-args", "--load", ckpt, "--hidden-dropout", "0.3"],
                       notes=notes)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_length) == (2, 32, 32)
    assert cfg.model.hidden_dropout == 0.3
    assert any("--num-layers 2 (was 4)" in n for n in notes)


def test_no_megatron_table_entry_shadows_a_megapre_flag():
    parser = build_parser()
    ours = {o for a in parser._actions for o in a.option_strings
            if not (a.dest.startswith(megatron_flags.NOOP_DEST) or a.dest.startswith("megatron_"))}
    for name in ours:
        assert megatron_flags.refused_reason(name) is None, name


def test_readme_carries_the_table():
    assert megatron_flags.readme_table() in README.read_text()


def _megapre_fields() -> set[str]:
    """megapre's own config flags (not the Megatron table's aliases, switches or no-ops)."""
    return {o for a in build_parser()._actions for o in a.option_strings
            if not (a.dest.startswith(megatron_flags.NOOP_DEST) or a.dest.startswith("megatron_"))
            and o not in megatron_flags.ALIASES}


def test_every_megatron_flag_has_one_answer():
    """Each of the 877 flags of Megatron's parser is honoured, an alias, built in, a no-op or
    refused (by feature or generically), never argparse's 'unrecognized', and in one group."""
    ours = {o for a in build_parser()._actions for o in a.option_strings}
    fields = _megapre_fields()
    assert len(MEGATRON_FLAGS) == 877
    for flag in sorted(MEGATRON_FLAGS):
        assert megatron_flags.classify(flag, ours) != "unknown", flag
        groups = [flag in megatron_flags.ALIASES, flag in megatron_flags.BUILTIN,
                  flag in megatron_flags.NOOPS, megatron_flags.refused_reason(flag) is not None,
                  flag in fields]
        assert sum(groups) <= 1, (flag, groups)
    counts = megatron_flags.coverage()
    assert sum(counts.values()) == 877 and counts["unknown"] == 0
    line = megatron_flags.coverage_line(counts)
    assert line.startswith("Megatron flags (d98e8a64dd): ") and "refused generically" in line


def test_no_noop_is_a_megapre_flag():
    fields = _megapre_fields()
    for table in (megatron_flags.NOOPS, megatron_flags.BUILTIN):
        assert not set(table) & fields


@pytest.mark.parametrize("extra,reason", [
    (["--batch-size", "4"], "use --micro-batch-size"),
    (["--mamba-state-dim", "16"], "Mamba and hybrid models are not supported"),
    (["--add-qkv-bias"], "a QKV-only bias is not supported")])
def test_cli_refuses_catalog_flags_with_their_reason(extra, reason):
    proc = subprocess.run([sys.executable, "-m", "megapre.pretrain", *BASE, *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert extra[0] in line and reason in line


def test_unlisted_megatron_flag_gets_the_generic_refusal(monkeypatch):
    """A Megatron flag that no table names (here one taken out of it) is refused by name;
    a word that is no Megatron flag stays argparse's error."""
    monkeypatch.delitem(megatron_flags.REFUSED, "--batch-size")
    with pytest.raises(ConfigError, match="^--batch-size: a Megatron-LM flag megapre does not"):
        parse_config(BASE + ["--batch-size", "4"])
    with pytest.raises(SystemExit):
        parse_config(BASE + ["--not-a-megatron-flag"])


def test_catalog_aliases_builtins_and_conditional_noops():
    cfg = parse_config(["--encoder-num-layers", "3", "--hidden-size", "64",
                        "--num-attention-heads", "4", "--encoder-seq-length", "48",
                        "--data-path", "A", "--persistent-save-interval", "7", "--save", "/c",
                        "--disable-manual-gc-eval", "--accumulate-allreduce-grads-in-fp32",
                        "--use-cpu-initialization", "--exit-signal-handler"])
    assert (cfg.model.num_layers, cfg.model.seq_length) == (3, 48)
    assert cfg.checkpoint.save_interval == 7 and cfg.train.manual_gc_eval is False
    rope = parse_config(BASE + ["--position-embedding-type", "rope", "--no-position-embedding"])
    assert rope.model.position_embedding_type == "rope"
    with pytest.raises(ConfigError, match="^--no-position-embedding"):
        parse_config(BASE + ["--no-position-embedding"])
    for extra in (["--rope-type", "yarn"], ["--softmax-type", "off-by-one"],
                  ["--lr-warmup-init", "1e-5"], ["--exp-avg-dtype", "bf16"]):
        with pytest.raises(ConfigError, match=f"^{extra[0]}"):
            parse_config(BASE + extra)
    parse_config(BASE + ["--rope-type", "rope", "--lr-warmup-init", "0.0", "--exp-avg-dtype",
                         "fp32", "--mid-level-dataset-surplus", "0.005"])
