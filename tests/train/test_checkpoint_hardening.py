"""Damaged or hostile checkpoints and failing disks: a full disk during a save names the path
and leaves the previous checkpoints whole; a latest file of non-ASCII bytes is named; DCP
metadata pointing outside the checkpoint is refused; the inspector finds missing or truncated
tensor files and --verify reads everything."""
from __future__ import annotations

import errno
import json
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from layout_cases import model_config
from megapre.cli.checkpoint import main as inspect_main
from megapre.model.config import ConfigError
from megapre.parallel import ParallelMesh
from megapre.train import checkpoint as ckpt
from megapre.train.checkpoint import (CheckpointSaveError, CorruptCheckpointError,
                                      SafeFileSystemReader, load_checkpoint, save_checkpoint)
from megapre.train.parallel_model import ParallelModel


@pytest.fixture
def mesh():
    return ParallelMesh.single(device="cpu")


@pytest.fixture
def model(mesh):
    return ParallelModel.build("gpt", model_config(num_layers=1), mesh, seed=3)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_names_the_path_and_keeps_the_previous(tmp_path, mesh, model, monkeypatch,
                                                         async_save):
    save_checkpoint(tmp_path, 1, model, None, mesh)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "__0_0.distcp"))

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointSaveError) as e:
        save_checkpoint(tmp_path, 2, model, None, mesh, async_save=async_save)
        ckpt.wait_for_pending_save()
    msg = str(e.value)
    assert "no space left on device" in msg and "iter_0000002.tmp-" in msg and \
        "previous checkpoints" in msg, msg
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", ckpt.LATEST_FILE]
    assert load_checkpoint(tmp_path, model, None, mesh)["iteration"] == 1


def test_latest_file_with_non_ascii_bytes_is_named(tmp_path, mesh, model):
    save_checkpoint(tmp_path, 1, model, None, mesh)
    (tmp_path / ckpt.LATEST_FILE).write_bytes(b"\xff\xfe1\x00")
    with pytest.raises(CorruptCheckpointError, match=f"{ckpt.LATEST_FILE} should hold an "
                                                     "iteration number in ASCII digits") as e:
        load_checkpoint(tmp_path, model, None, mesh)
    assert isinstance(e.value, ConfigError) and "delete it" in str(e.value)


def _rewrite_paths(path, new_path) -> None:
    meta_file = path / ckpt.DCP_METADATA
    metadata = SafeFileSystemReader(path).read_metadata()
    for index, info in list(metadata.storage_data.items()):
        metadata.storage_data[index] = type(info)(new_path(info.relative_path), info.offset,
                                                  info.length, *(
                                                      [info.transform_descriptors]
                                                      if hasattr(info, "transform_descriptors")
                                                      else []))
    metadata.storage_meta = None
    meta_file.write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("outside", ["../{}", "/etc/{}", "sub/../../{}"])
def test_storage_paths_outside_the_checkpoint_are_refused(tmp_path, mesh, model, outside):
    path = save_checkpoint(tmp_path / "ckpt", 1, model, None, mesh)
    _rewrite_paths(path, outside.format)
    with pytest.raises(CorruptCheckpointError, match="not inside the checkpoint directory"):
        load_checkpoint(tmp_path / "ckpt", model, None, mesh)
    assert inspect_main([str(tmp_path / "ckpt")]) == 2


def test_inspector_finds_missing_and_truncated_files(tmp_path, mesh, model, capsys):
    path = save_checkpoint(tmp_path, 1, model, None, mesh)
    assert inspect_main([str(tmp_path), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    shards = sorted(path.glob("*.distcp"))
    assert info["problems"] == [] and set(info["sha256"]) == {p.name for p in shards}
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:len(data) // 2])
    assert inspect_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{shards[0]} is truncated: {len(data) // 2} bytes" in err, err
    shards[0].unlink()
    assert inspect_main([str(tmp_path)]) == 2
    assert f"{shards[0]} is missing" in capsys.readouterr().err


def test_verify_reports_non_finite_values(tmp_path, mesh, model, capsys):
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_checkpoint(tmp_path, 1, model, None, mesh)
    assert inspect_main([str(tmp_path)]) == 0  # the files are whole
    capsys.readouterr()
    assert inspect_main([str(tmp_path), "--verify"]) == 2
    assert "holds NaN or infinite values" in capsys.readouterr().err


def test_pretrain_cli_disk_full_is_one_line_and_releases_the_lock(tmp_path, monkeypatch, capsys):
    """`megapre.pretrain` whose save hits a full disk: one line naming the path, exit 1, the
    save directory's lock removed (a rerun after freeing space must not meet a stale lock)."""
    from conftest import COUNTING_VOCAB, write_counting_corpus
    from megapre.cli.pretrain import main as pretrain_main

    prefix = write_counting_corpus(tmp_path / "count")

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "__0_0.distcp"))

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full)
    rc = pretrain_main(["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                        "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "2",
                        "--data-path", prefix, "--split", "90,10,0", "--num-workers", "0",
                        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(COUNTING_VOCAB - 1),
                        "--device", "cpu", "--save", str(tmp_path / "ckpt"), "--log-interval", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "no space left on device" in lines[0] and "ckpt" in lines[0], err
    assert "Traceback" not in err
    assert not [p for p in (tmp_path / "ckpt").iterdir() if "lock" in p.name]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_pretrain_cli_bad_sample_mid_run_is_one_line(tmp_path, monkeypatch, capsys, workers):
    """Bad data found while training (ids outside the vocabulary in a sample the open-time look
    missed), also from inside a DataLoader worker: one line naming the .bin file, exit 2."""
    from conftest import COUNTING_VOCAB, write_counting_corpus
    from megapre.cli.pretrain import main as pretrain_main
    from megapre.data import tokenizer_check

    prefix = write_counting_corpus(tmp_path / "count", eod=COUNTING_VOCAB + 20)  # eod id too big
    monkeypatch.setattr(tokenizer_check, "check_token_ids", lambda dataset, vocab: None)
    rc = pretrain_main(["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                        "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "2",
                        "--data-path", prefix, "--split", "90,10,0", "--num-workers", workers,
                        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(COUNTING_VOCAB - 1),
                        "--device", "cpu", "--data-cache-path", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("megapre.pretrain: error: ") and "count.bin" in lines[0], err
