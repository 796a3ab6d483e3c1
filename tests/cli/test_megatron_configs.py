"""Megatron-LM's own functional-test configs (tests/fixtures/megatron_configs, commit
d98e8a64dd) through `--config`, unchanged: each one parses and validates, or is refused with one
line that names a flag it uses and says the feature is missing. No config may hit an unknown
flag (that would mean a Megatron flag megapre neither honours nor lists)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megapre.cli import megatron_flags
from megapre.cli.flags import parse_config
from megapre.errors import ConfigError
from megapre.train.args import validate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "megatron_configs"
CONFIGS = sorted(FIXTURES.glob("*/*.yaml"))
ENV = {name: f"/data/{name.lower()}" for name in (
    "DATA_PATH", "CHECKPOINT_SAVE_PATH", "CHECKPOINT_LOAD_PATH", "TENSORBOARD_PATH",
    "DATA_CACHE_PATH", "WANDB_SAVE_PATH", "INFERENCE_OUTPUT_PATH", "WANDB_EXPERIMENT")}
ENV.update(DATA_BLEND="0.5 /data/a_text_document 0.5 /data/b_text_document", REPEAT="1")
# Where the test fixtures stand today: refusals name features megapre lacks (see the table in
# megapre/cli/megatron_flags.py); raise this as features land, never lower it.
MIN_ACCEPTED = 141


def _model_args(path: Path) -> dict:
    return yaml.safe_load(path.read_text()).get("MODEL_ARGS") or {}


def _world_size(args: dict, path: Path | None = None) -> int:
    """Megatron's functional tests run on one 8-GPU node unless the case's MODEL_ENV_VARS names
    its GPUS_PER_NODE; a layout bigger than that alone."""
    gpus = 8
    if path is not None:
        env = (yaml.safe_load(path.read_text()).get("MODEL_ENV_VARS") or {}).get("MODEL_ARGS")
        gpus = int((env or {}).get("GPUS_PER_NODE", 8))
    cells = 1
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--context-parallel-size"):
        cells *= int(args.get(flag, 1))
    return gpus if gpus % cells == 0 else cells


def _outcome(path: Path) -> str | None:
    """None when the config parses and validates, else the refusal's message."""
    args = _model_args(path)
    try:
        cfg = parse_config(["--config", str(path)])
        validate(cfg, _world_size(args, path), vocab_size=50304)
    except ConfigError as e:
        return str(e)
    return None


def test_fixtures_are_the_216_gpt_and_bert_configs():
    assert len(CONFIGS) == 216, "store all GPT/BERT model_config.yaml files of commit d98e8a64dd"
    assert {p.parent.name for p in CONFIGS} == {"gpt", "bert"}


def test_every_config_parses_or_is_refused_by_name(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    accepted, refused = [], {}
    for path in CONFIGS:
        message = _outcome(path)  # an unknown flag would be SystemExit(2): the test fails
        if message is None:
            accepted.append(path.stem)
            continue
        flag = message.split(":")[0].split()[0]
        if flag == "--config":  # one inference case of the suite has no MODEL_ARGS at all
            assert "MODEL_ARGS section is empty" in message and not _model_args(path), message
            refused[path.stem] = message
            continue
        assert flag in _model_args(path), f"{path.name}: refusal names {flag!r}: {message}"
        known = megatron_flags.refused_reason(flag) is not None or flag in megatron_flags.NOOPS
        assert known, f"{path.name}: {message}"
        assert "\n" not in message
        refused[path.stem] = message
    assert len(accepted) >= MIN_ACCEPTED, sorted(refused.items())[:20]
    # The plain GPT and BERT layouts of Megatron's suite are among the accepted
    for case in ("bert_mcore_tp2_pp2", "gpt3_mcore_te_tp2_pp2"):
        assert case in accepted, refused.get(case)


@pytest.mark.parametrize("flag", ["--num-experts", "--fp8-format", "--multi-latent-attention",
                                  "--inference-max-seq-length", "--rl-use-sequence-packing"])
def test_refused_families_are_named(flag):
    assert megatron_flags.refused_reason(flag) is not None
