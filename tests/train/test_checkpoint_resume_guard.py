"""Resuming through the Trainer: a --load that finds nothing is loud (and an error with flags
that only mean something when loading), a changed lr schedule is named with Megatron's two flags
for the choice, another tokenizer or another model is refused before anything trains or saves."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import COUNTING_VOCAB, write_counting_corpus
from megapre.cli.flags import parse_config
from megapre.model.config import ConfigError
from megapre.train.checkpoint import CheckpointMismatchError
from megapre.train.checkpoint_tokenizer import TokenizerMismatchError
from megapre.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_counting_corpus(str(tmp_path_factory.mktemp("corpus") / "count_text_document"))


def _args(corpus: str, work: Path, *extra: str) -> list[str]:
    return ["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "2", "--lr", "3e-3",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0",
            "--log-interval", "1", "--data-path", corpus, "--split", "100,0,0",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(COUNTING_VOCAB - 1),
            "--make-vocab-size-divisible-by", "8", "--num-workers", "0", "--device", "cpu",
            "--data-cache-path", str(work / "cache"), *extra]


def _trainer(corpus: str, work: Path, *extra: str) -> Trainer:
    return Trainer(parse_config(_args(corpus, work, *extra)))


def _train(corpus: str, work: Path, *extra: str) -> dict:
    trainer = _trainer(corpus, work, *extra)
    try:
        return trainer.train()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory) -> Path:
    """A 2-step run saved at iteration 2."""
    work = tmp_path_factory.mktemp("saved")
    _train(corpus, work, "--save", str(work / "ckpt"))
    return work / "ckpt"


def test_missing_load_dir_warns_and_records_a_fresh_start(corpus, tmp_path, capsys):
    trainer = _trainer(corpus, tmp_path, "--load", str(tmp_path / "typo"))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert f"WARNING: --load {tmp_path / 'typo'}: no such directory; STARTING FROM SCRATCH" in out
    assert trainer.load_info["started_from_scratch"] and trainer.load_info["resumed_from"] is None
    assert summary["started_from"] == f"scratch (--load {tmp_path / 'typo'} held no checkpoint)"


@pytest.mark.parametrize("flag", ["--finetune", "--no-load-optim", "--no-load-rng"])
def test_load_flags_without_a_checkpoint_are_errors(corpus, tmp_path, flag):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"holds no checkpoint, but {flag} asks to load"):
        _trainer(corpus, tmp_path, "--load", str(tmp_path / "empty"), flag)


def test_resume_records_where_it_came_from(corpus, saved, tmp_path):
    trainer = _trainer(corpus, tmp_path, "--load", str(saved), "--train-iters", "2")
    try:
        assert trainer.train()["started_from"] == str(saved / "iter_0000002")
    finally:
        trainer.close()
    assert trainer.load_info["resumed_from"] == str(saved / "iter_0000002")
    assert trainer.load_info["resumed_iteration"] == 2
    assert not trainer.load_info["started_from_scratch"]


def test_changed_schedule_is_named_with_both_flags(corpus, saved, tmp_path, capsys):
    trainer = _trainer(corpus, tmp_path, "--load", str(saved), "--train-iters", "4")
    trainer.close()
    out = capsys.readouterr().out
    assert "WARNING: the lr schedule differs from the checkpoint's: --lr-decay-iters (default " \
           "--train-iters) 2 (checkpoint) vs 4 (now)" in out, out
    assert "--use-checkpoint-opt_param-scheduler" in out and \
           "--override-opt_param-scheduler" in out
    assert trainer.schedule.decay_iters == 4
    kept = _trainer(corpus, tmp_path, "--load", str(saved), "--train-iters", "4",
                    "--use-checkpoint-opt_param-scheduler")
    kept.close()
    assert kept.schedule.decay_iters == 2 and kept.schedule(3) == 0.0  # the saved cosine's end
    override = _trainer(corpus, tmp_path, "--load", str(saved), "--train-iters", "4",
                        "--override-opt_param-scheduler")
    override.close()
    assert override.schedule.decay_iters == 4
    assert "lr schedule differs" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="exclude each other"):
        _trainer(corpus, tmp_path, "--override-opt_param-scheduler",
                 "--use-checkpoint-opt_param-scheduler")


def _edit_meta(ckpt: Path, edit) -> None:
    meta_file = ckpt / "iter_0000002" / "meta.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))


def test_tokenizer_fingerprint_is_checked_on_resume(corpus, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    _train(corpus, tmp_path, "--save", str(ckpt))
    _edit_meta(ckpt, lambda m: m["tokenizer"].update(fingerprint="0" * 64))
    with pytest.raises(TokenizerMismatchError, match=r"checkpoint NullTokenizer 0{16} vs now "
                                                     r"NullTokenizer [0-9a-f]{16}.*"
                                                     "--allow-tokenizer-mismatch"):
        _trainer(corpus, tmp_path, "--load", str(ckpt))
    _trainer(corpus, tmp_path, "--load", str(ckpt), "--allow-tokenizer-mismatch").close()
    assert "continuing (--allow-tokenizer-mismatch)" in capsys.readouterr().out
    _edit_meta(ckpt, lambda m: m.pop("tokenizer"))  # as saved by an older megapre
    _trainer(corpus, tmp_path, "--load", str(ckpt)).close()
    assert "records no tokenizer fingerprint" in capsys.readouterr().out


def test_other_model_is_refused_before_anything_is_pruned(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(corpus, tmp_path, "--save", str(ckpt))
    with pytest.raises(CheckpointMismatchError, match="--num-layers 2 .checkpoint. vs 1 .now."):
        _trainer(corpus, tmp_path, "--load", str(ckpt), "--save", str(ckpt), "--keep-last", "1",
                 "--num-layers", "1")
    assert (ckpt / "iter_0000002").is_dir() and not (ckpt / ".megapre-save.lock").exists()
    # the program: one line, exit 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "megapre.pretrain",
                           *_args(corpus, tmp_path, "--load", str(ckpt), "--num-layers", "1")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(errors) == 1 and errors[0].startswith("megapre.pretrain: error: checkpoint "), \
        proc.stderr
