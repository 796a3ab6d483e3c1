"""A checkpoint of another architecture is refused, naming every setting that differs, unless
--dist-ckpt-strictness asks for a deliberate partial load; settings that leave the weights'
meaning alone (dropout, attention backend, ...) may change on a resume."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from layout_cases import model_config
from megapre.model.config import ConfigError
from megapre.parallel import ParallelMesh
from megapre.train.checkpoint import (CheckpointMismatchError, load_checkpoint, save_checkpoint)
from megapre.train.parallel_model import ParallelModel


@pytest.fixture
def mesh():
    return ParallelMesh.single(device="cpu")


@pytest.fixture
def saved(tmp_path, mesh):
    model = ParallelModel.build("gpt", model_config(num_layers=2), mesh, seed=3)
    save_checkpoint(tmp_path, 1, model, None, mesh)
    return tmp_path


def _model(mesh, **changes):
    return ParallelModel.build("gpt", dataclasses.replace(model_config(num_layers=2), **changes),
                               mesh, seed=1)


@pytest.mark.parametrize("changes,named", [
    ({"num_layers": 1}, "--num-layers 2 (checkpoint) vs 1 (now)"),
    ({"position_embedding_type": "rope"},
     "--position-embedding-type 'learned_absolute' (checkpoint) vs 'rope' (now)"),
    ({"add_bias_linear": False}, "--disable-bias-linear (add_bias_linear) True (checkpoint)"),
    ({"normalization": "RMSNorm"}, "--normalization 'LayerNorm' (checkpoint) vs 'RMSNorm'"),
    ({"num_attention_heads": 2, "num_query_groups": 2, "kv_channels": 16},  # same shapes
     "--num-attention-heads 4 (checkpoint) vs 2 (now)"),
])
def test_other_architecture_is_refused(saved, mesh, changes, named):
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(saved, _model(mesh, **changes), None, mesh)
    msg = str(e.value)
    assert named in msg and "--dist-ckpt-strictness" in msg and "\n" not in msg, msg
    assert isinstance(e.value, ConfigError)  # the programs print it as one line, exit 2


def test_unused_tensors_are_named(saved, mesh):
    with pytest.raises(CheckpointMismatchError, match=r"does not use: 'model\..*layers\.1\."):
        load_checkpoint(saved, _model(mesh, num_layers=1), None, mesh)


def test_benign_settings_may_change(saved, mesh):
    model = _model(mesh, hidden_dropout=0.3, attention_dropout=0.2, attention_backend="sdpa",
                   init_method_std=0.5, seq_length=8, bias_activation_fusion=False)
    assert load_checkpoint(saved, model, None, mesh)["iteration"] == 1


def test_partial_load_by_strictness(saved, mesh):
    shallow = _model(mesh, num_layers=1)
    with pytest.warns(UserWarning, match=r"partial load.*log_unexpected.*--num-layers 2"):
        load_checkpoint(saved, shallow, None, mesh, strictness="log_unexpected")
    deeper = _model(mesh, num_layers=3)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.2\..* missing"):
        load_checkpoint(saved, deeper, None, mesh, strictness="log_unexpected")
    before = {n: p.clone() for n, p in deeper.named_parameters()}
    with pytest.warns(UserWarning, match="keeps its initialization"):
        load_checkpoint(saved, deeper, None, mesh, strictness="log_all")
    changed = {n for n, p in deeper.named_parameters() if not torch.equal(p, before[n])}
    assert any("layers.0.attention.qkv.weight" in n for n in changed), changed
    assert not any("layers.2." in n for n in changed), changed
    with pytest.raises(ConfigError, match="--dist-ckpt-strictness 'bogus'"):
        load_checkpoint(saved, shallow, None, mesh, strictness="bogus")


def test_strictness_from_a_config_file_is_validated(tmp_path):
    from megapre.cli.flags import parse_config
    from megapre.train.args import validate

    config = tmp_path / "run.json"
    config.write_text('{"dist_ckpt_strictness": "assume_ok_unexpected", "data_path": ["x"], '
                      '"tokenizer_type": "NullTokenizer", "vocab_size": 40}')
    with pytest.raises(ConfigError, match="--dist-ckpt-strictness 'assume_ok_unexpected': "
                                          "choose one of raise_all, log_unexpected, log_all"):
        validate(parse_config(["--config", str(config)]), 1, 40)
