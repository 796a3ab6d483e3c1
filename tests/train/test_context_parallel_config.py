"""--context-parallel-size: how it enters the run plan, and the one-line errors that name it."""
from __future__ import annotations

import pytest

from megapre.cli.flags import parse_config
from megapre.errors import ConfigError
from megapre.train.args import validate
from megapre.train.runtime import build_runtime

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--data-path", "A", "--attention-dropout", "0"]


def test_context_parallel_takes_its_share_of_the_world():
    cfg = parse_config(BASE + ["--context-parallel-size", "2", "--tensor-model-parallel-size",
                               "2", "--micro-batch-size", "3"])
    assert cfg.parallel.context_parallel_size == 2
    plan = validate(cfg, 16)
    assert plan.dp_size == 4 and plan.global_batch_size == 12  # CP ranks share DP's samples
    assert validate(parse_config(BASE), 4).dp_size == 4  # default: no context parallelism


@pytest.mark.parametrize("extra, world, match", [
    (["--context-parallel-size", "0"], 1, "--context-parallel-size must be a positive integer"),
    (["--context-parallel-size", "3"], 6,
     "--context-parallel-size 3 needs --seq-length 16 divisible by 2 x 3 = 6"),
    (["--context-parallel-size", "2", "--attention-dropout", "0.1"], 2,
     "--context-parallel-size 2 needs --attention-dropout 0"),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"], 6,
     "world size 6 is not divisible by --tensor-model-parallel-size 2 x "
     "--context-parallel-size 2 x --pipeline-model-parallel-size 1 = 4"),
])
def test_validator_names_the_flag(extra, world, match):
    with pytest.raises(ConfigError) as err:
        validate(parse_config(BASE + extra), world)
    assert match in str(err.value) and "\n" not in str(err.value)


def test_programs_other_than_pretraining_refuse_context_parallelism():
    cfg = parse_config(BASE + ["--context-parallel-size", "2"])
    with pytest.raises(ConfigError, match="--context-parallel-size 2 is for pretraining"):
        build_runtime(cfg)


def test_models_refuse_attention_dropout_on_a_context_parallel_mesh():
    from megapre.model.bert import BertModel
    from megapre.model.gpt import GPTModel
    from megapre.parallel.mesh import ParallelConfig, ParallelMesh

    from layout_cases import model_config

    class _CPMesh(ParallelMesh):  # CP coordinates without processes: construction only
        def __init__(self):
            super().__init__(ParallelConfig(context_parallel=2), ParallelMesh.single().device,
                             0, 2, dict.fromkeys(("pp", "dp", "cp", "tp", "dp_cp")), None, None)
    cfg = model_config()
    cfg.attention_dropout = 0.1
    for model in (GPTModel, BertModel):
        with pytest.raises(ConfigError, match="needs --attention-dropout 0"):
            model(cfg, _CPMesh())
