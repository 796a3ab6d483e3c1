"""Checkpoints in one process: atomic publication, keep-last pruning, async save, exact resume,
and what loading refuses (pickled objects, mismatched models, missing or partial checkpoints)."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from layout_cases import micro_batches, model_config
from megapre.parallel import ParallelMesh
from megapre.parallel.random import set_random_seed
from megapre.cli.checkpoint import main as describe_main
from megapre.train import checkpoint as ckpt
from megapre.train.checkpoint import (CheckpointMismatchError, CheckpointNotFoundError,
                                      CorruptCheckpointError, load_checkpoint, save_checkpoint)
from megapre.train.parallel_model import ParallelModel
from megapre.train.rng_state import UnsafeCheckpointError
from megapre.train.state_dict import full_state
from megapre.train.step import StepConfig, TrainStep

MICRO, GLOBAL = 2, 4


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mesh():
    return ParallelMesh.single(device="cpu")


def _trained(kind, mesh, steps=1, seed=5, cfg=None, tracker=None):
    model = ParallelModel.build(kind, cfg or model_config(num_layers=2), mesh, seed=seed,
                                tracker=tracker)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    step = TrainStep(model, opt, StepConfig(MICRO, GLOBAL))
    for it in range(steps):
        step(iter(micro_batches(kind, it, GLOBAL, MICRO, 0, 1)))
    return model, opt, step


def _state(model, opt, mesh):
    return full_state(model.models, opt, mesh, model.adapter.cfg)


def _assert_same(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _iters(root):
    return sorted(p.name for p in root.iterdir())


def test_round_trip_with_extra_and_config(tmp_path, mesh):
    model, opt, _ = _trained("gpt", mesh)
    extra = {"skipped_total": 0,
             "loss_scaler": {"scale": torch.tensor(65536.0), "growth_tracker": 3}}
    config = {"train": {"seed": 11}, "model": {"num_layers": 2}}
    path = save_checkpoint(tmp_path, 1, model, opt, mesh, consumed_samples=4, config=config,
                           extra=extra)
    assert (tmp_path / ckpt.LATEST_FILE).read_text().strip() == "1"
    assert json.loads((path / ckpt.CONFIG_FILE).read_text()) == config
    assert ckpt.find_latest(tmp_path) == path
    fresh, fresh_opt, _ = _trained("gpt", mesh, steps=0, seed=9)
    info = load_checkpoint(tmp_path, fresh, fresh_opt, mesh)
    assert info["iteration"] == 1 and info["consumed_samples"] == 4 and info["config"] == config
    assert torch.equal(info["extra"]["loss_scaler"]["scale"], torch.tensor(65536.0))
    assert info["extra"]["loss_scaler"]["growth_tracker"] == 3
    _assert_same(_state(fresh, fresh_opt, mesh), _state(model, opt, mesh))


def test_weights_only_load_needs_no_optimizer(tmp_path, mesh):
    model, opt, _ = _trained("bert", mesh)
    save_checkpoint(tmp_path, 1, model, opt, mesh)
    fresh, _, _ = _trained("bert", mesh, steps=0, seed=9)
    load_checkpoint(tmp_path, fresh, None, mesh)
    _assert_same(_state(fresh, None, mesh), _state(model, None, mesh))
    save_checkpoint(tmp_path, 2, model, None, mesh)  # weights only
    _, fresh_opt, _ = _trained("bert", mesh, steps=0, seed=9)
    with pytest.warns(UserWarning, match="no optimizer state"):
        load_checkpoint(tmp_path, fresh, fresh_opt, mesh)  # a fresh optimizer stays fresh
    assert not any(fresh_opt.state.values())
    with pytest.raises(CheckpointMismatchError, match="--no-load-optim"):
        load_checkpoint(tmp_path, model, opt, mesh)  # this optimizer has state to restore


def test_exact_resume_single_process(tmp_path, mesh):
    cfg = dataclasses.replace(model_config(num_layers=2), hidden_dropout=0.3,
                              attention_dropout=0.3)

    def run(n, resume=False, save_at=None):
        tracker = set_random_seed(3, mesh)
        np.random.seed(3)
        random.seed(3)
        model, opt, step = _trained("gpt", mesh, steps=0, seed=3, cfg=cfg, tracker=tracker)
        if resume:
            load_checkpoint(tmp_path, model, opt, mesh)
        losses = []
        for it in range(n):
            batch = int(np.random.randint(100)) + random.randrange(100)
            losses.append(step(iter(micro_batches("gpt", batch, GLOBAL, MICRO, 0, 1))).loss)
            if it + 1 == save_at:
                save_checkpoint(tmp_path, it + 1, model, opt, mesh)
        return losses

    straight = run(6, save_at=3)
    assert run(3, resume=True) == straight[3:]


def test_killed_save_leaves_previous_checkpoint(tmp_path, mesh, monkeypatch):
    model, opt, step = _trained("gpt", mesh)
    save_checkpoint(tmp_path, 1, model, opt, mesh)
    saved = _state(model, opt, mesh)
    step(iter(micro_batches("gpt", 1, GLOBAL, MICRO, 0, 1)))

    def die(self, plan, planner):
        assert any(p.name.startswith("iter_0000002.tmp-") for p in tmp_path.iterdir())
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", die)
    with pytest.raises(BaseException, match="killed while writing"):
        save_checkpoint(tmp_path, 2, model, opt, mesh)
    monkeypatch.undo()
    assert ckpt.latest_iteration(tmp_path) == 1
    assert not (tmp_path / "iter_0000002").exists()
    fresh, fresh_opt, _ = _trained("gpt", mesh, steps=0, seed=9)
    assert load_checkpoint(tmp_path, fresh, fresh_opt, mesh)["iteration"] == 1
    _assert_same(_state(fresh, fresh_opt, mesh), saved)
    save_checkpoint(tmp_path, 3, model, opt, mesh)  # a later save clears the leftover
    assert _iters(tmp_path) == ["iter_0000001", "iter_0000003", ckpt.LATEST_FILE]
    # killed while re-saving iteration 3, between moving the old copy aside and the new one in
    (tmp_path / "iter_0000003").rename(tmp_path / "iter_0000003.old-00ff")
    with pytest.warns(UserWarning, match="moved aside"):
        assert load_checkpoint(tmp_path, fresh, fresh_opt, mesh)["iteration"] == 3


def test_keep_last_and_resave(tmp_path, mesh):
    model, opt, _ = _trained("gpt", mesh)
    for it in (1, 2, 3, 4):
        save_checkpoint(tmp_path, it, model, opt, mesh, keep_last=2)
    assert _iters(tmp_path) == ["iter_0000003", "iter_0000004", ckpt.LATEST_FILE]
    # A run resumed from an older checkpoint: the newest K by iteration stay, and so does latest.
    save_checkpoint(tmp_path, 2, model, opt, mesh, keep_last=2)
    assert ckpt.latest_iteration(tmp_path) == 2
    assert _iters(tmp_path) == ["iter_0000002", "iter_0000003", "iter_0000004", ckpt.LATEST_FILE]
    save_checkpoint(tmp_path, 2, model, opt, mesh, keep_last=1)  # same iteration again
    assert _iters(tmp_path) == ["iter_0000002", "iter_0000004", ckpt.LATEST_FILE]
    with pytest.raises(ValueError, match="--keep-last"):
        save_checkpoint(tmp_path, 5, model, opt, mesh, keep_last=0)


def test_save_retain_interval_keeps_multiples_and_the_latest(tmp_path, mesh):
    """Megatron's --save-retain-interval: only iterations divisible by it survive, plus the
    checkpoint `latest` names."""
    model, opt, _ = _trained("gpt", mesh)
    for it in (2, 4, 6, 8, 10):
        save_checkpoint(tmp_path, it, model, opt, mesh, retain_interval=4)
    assert _iters(tmp_path) == ["iter_0000004", "iter_0000008", "iter_0000010", ckpt.LATEST_FILE]


def test_async_save_snapshots_state(tmp_path, mesh):
    model, opt, step = _trained("gpt", mesh)
    saved = _state(model, opt, mesh)
    save_checkpoint(tmp_path, 1, model, opt, mesh, async_save=True)
    step(iter(micro_batches("gpt", 1, GLOBAL, MICRO, 0, 1)))  # training goes on meanwhile
    ckpt.wait_for_pending_save()
    assert ckpt.latest_iteration(tmp_path) == 1
    fresh, fresh_opt, _ = _trained("gpt", mesh, steps=0, seed=9)
    load_checkpoint(tmp_path, fresh, fresh_opt, mesh)
    _assert_same(_state(fresh, fresh_opt, mesh), saved)


def test_pickled_object_in_rng_file_is_refused(tmp_path, mesh):
    model, opt, _ = _trained("gpt", mesh)
    path = save_checkpoint(tmp_path, 1, model, opt, mesh)
    rng_file = path / ckpt.RNG_DIR / "rank_0_0_0.pt"
    states = torch.load(rng_file, weights_only=True)
    marker = tmp_path / "executed"
    states["evil"] = _Evil(str(marker))
    torch.save(states, rng_file)
    fresh, fresh_opt, _ = _trained("gpt", mesh, steps=0, seed=9)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        load_checkpoint(tmp_path, fresh, fresh_opt, mesh)
    assert not marker.exists()
    load_checkpoint(tmp_path, fresh, fresh_opt, mesh, load_rng=False)  # the way out it names


def test_pickled_object_in_dcp_metadata_is_refused(tmp_path, mesh):
    model, opt, _ = _trained("gpt", mesh)
    path = save_checkpoint(tmp_path, 1, model, opt, mesh)
    marker = tmp_path / "executed"
    with open(path / ckpt.DCP_METADATA, "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    with pytest.raises(CorruptCheckpointError, match="not allowed"):
        load_checkpoint(tmp_path, model, opt, mesh)
    assert not marker.exists()


class _Evil:
    """Unpickling this would create a file (stands in for running arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_no_checkpoint_error_names_dir_and_contents(tmp_path, mesh):
    model, opt, _ = _trained("gpt", mesh, steps=0)
    (tmp_path / "notes.txt").write_text("x")
    assert ckpt.find_latest(tmp_path) is None and ckpt.find_latest(tmp_path / "absent") is None
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint found in .*notes\.txt"):
        load_checkpoint(tmp_path, model, opt, mesh)
    with pytest.raises(CheckpointNotFoundError, match="no such directory"):
        load_checkpoint(tmp_path / "absent", model, opt, mesh)


def test_partial_checkpoint_is_reported(tmp_path, mesh):
    model, opt, _ = _trained("gpt", mesh)
    path = save_checkpoint(tmp_path, 1, model, opt, mesh)
    (path / ckpt.DCP_METADATA).unlink()
    with pytest.raises(CorruptCheckpointError, match=r"incomplete: \.metadata missing"):
        load_checkpoint(tmp_path, model, opt, mesh)
    with pytest.raises(CorruptCheckpointError, match="incomplete"):
        ckpt.find_latest(tmp_path)  # never a silent fresh start
    (tmp_path / ckpt.LATEST_FILE).write_text("soon\n")
    with pytest.raises(CorruptCheckpointError, match="iteration number"):
        load_checkpoint(tmp_path, model, opt, mesh)
    path = save_checkpoint(tmp_path, 2, model, opt, mesh)
    for f in path.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])  # truncated copy
    with pytest.raises(CorruptCheckpointError, match="reading the tensors of checkpoint"):
        load_checkpoint(tmp_path, model, opt, mesh)
    (tmp_path / ckpt.LATEST_FILE).write_text("soon\n")
    with pytest.raises(CorruptCheckpointError, match="iteration number"):
        load_checkpoint(tmp_path, model, opt, mesh)


def test_shape_mismatch_names_param_shapes_and_flags(tmp_path, mesh):
    model, opt, _ = _trained("gpt", mesh)
    save_checkpoint(tmp_path, 1, model, opt, mesh)
    other = model_config(num_layers=2, hidden=48)
    fresh = ParallelModel.build("gpt", other, mesh, seed=1)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tmp_path, fresh, None, mesh)
    msg = str(e.value)
    assert "'model.embedding.word.weight' has shape (61, 32) in the checkpoint but (61, 48) " \
           "in this model" in msg, msg
    assert "--hidden-size 32 (checkpoint) vs 48 (now)" in msg, msg
    deeper = ParallelModel.build("gpt", model_config(num_layers=3), mesh, seed=1)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.2\..* missing.*--num-layers 2"):
        load_checkpoint(tmp_path, deeper, None, mesh)
    bert = ParallelModel.build("bert", model_config(num_layers=2), mesh, seed=1)
    with pytest.raises(CheckpointMismatchError, match="holds a gpt model"):
        load_checkpoint(tmp_path, bert, None, mesh)


def test_layout_change_reseeds_with_warning(tmp_path, mesh, monkeypatch):
    model, opt, _ = _trained("gpt", mesh)
    path = save_checkpoint(tmp_path, 1, model, opt, mesh, config={"train": {"seed": 21}})
    meta = json.loads((path / ckpt.META_FILE).read_text())
    meta["layout"]["tp"] = 2  # as if saved under TP2
    (path / ckpt.META_FILE).write_text(json.dumps(meta))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"layout differs.*seed 21 \+ iteration 1"):
        load_checkpoint(tmp_path, model, opt, mesh)
    after = torch.rand(3)
    torch.manual_seed(22)
    assert torch.equal(after, torch.rand(3))


def test_bad_extra_is_refused_before_writing(tmp_path, mesh):
    model, opt, _ = _trained("gpt", mesh, steps=0)
    with pytest.raises(TypeError, match="extra state 'scaler'"):
        save_checkpoint(tmp_path, 1, model, opt, mesh, extra={"scaler": object()})
    assert os.listdir(tmp_path) == []


def test_describe_cli(tmp_path, mesh, capsys):
    model, opt, _ = _trained("gpt", mesh)
    save_checkpoint(tmp_path, 1, model, opt, mesh, consumed_samples=4)
    assert describe_main([str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    n_params = sum(p.numel() for p in model.parameters()) - 3 * 32  # vocab padding 64 -> 61
    assert info["iteration"] == 1 and info["checkpoints"] == ["iter_0000001"]
    assert info["parameters"] == n_params and info["has_optimizer_state"]
    assert info["saved_layout"] == {"tp": 1, "pp": 1, "dp": 1, "vp": None, "world": 1}
    assert describe_main([str(tmp_path / "absent")]) == 2
    assert "no such directory" in capsys.readouterr().err
    # the documented module path runs the same front end
    proc = subprocess.run([sys.executable, "-m", "megapre.train.checkpoint", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == info
