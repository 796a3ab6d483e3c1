"""Knowledge distillation in pretraining (--teacher-checkpoint): a 2-layer GPT student learns
from a 4-layer teacher trained briefly first. The per-iteration losses of TP2 (with and without
sequence parallelism), DP2, PP2 and TP2 x PP2 equal one process's; --kd-alpha 1 is plain training exactly; the
teacher stays frozen and out of the student's checkpoints; a resumed run continues exactly; bad
input is one line and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_gpt_flags, write_counting_corpus
from conftest import train_in_process as _train
from layout_cases import one_thread, preload_worker_modules
from megapre.parallel.testing import run_distributed

KD = ("--kd-alpha", "0.3", "--kd-temperature", "2", "--kd-hidden-weight", "0.1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("distill")
    corpus = write_counting_corpus(str(work / "count_text_document"))
    teacher = work / "teacher"
    _train(tiny_gpt_flags(corpus, work / "t", "--save", str(teacher), train_iters=15,
                          num_layers=4))
    return {"corpus": corpus, "teacher": str(teacher), "work": work}


def _student(setup: dict, out: Path, *extra: str, **settings) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return tiny_gpt_flags(setup["corpus"], out, "--teacher-checkpoint", setup["teacher"], *extra,
                          **{"num_layers": 2, **settings})


def _losses(out: Path) -> list[tuple[float, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if "split" not in r]


def _layout_worker(rank: int, world: int, flags: list[str], out: str) -> None:
    _train(flags)


LAYOUTS = {"tp2": ("--tensor-model-parallel-size", "2"),
           "tp2-sp": ("--tensor-model-parallel-size", "2", "--sequence-parallel"),
           "dp2": (),
           "pp2": ("--pipeline-model-parallel-size", "2"),
           "tp2-pp2": ("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(setup, name):
    preload_worker_modules()
    ref = setup["work"] / "ref"
    if not (ref / "metrics.jsonl").is_file():
        with one_thread():
            _train(_student(setup, ref, *KD))
    out = setup["work"] / name
    # global batch 4 = micro 2 x 2: two micro-batches, one per DP rank under DP2
    world = 4 if name == "tp2-pp2" else 2
    run_distributed(_layout_worker, world, _student(setup, out, *KD, *LAYOUTS[name]), str(out),
                    timeout_s=300)
    got, want = _losses(out), _losses(ref)
    assert len(got) == len(want) == 3
    for (loss, norm), (rloss, rnorm) in zip(got, want):
        assert loss == pytest.approx(rloss, rel=1e-5)
        assert norm == pytest.approx(rnorm, rel=1e-5)
    rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd_loss"] > 0 and r["hidden_loss"] > 0 for r in rows)


def test_alpha_one_is_plain_training(setup, tmp_path):
    """Bit for bit, dropout masks included: the teacher's load leaves the random streams alone."""
    _train(tiny_gpt_flags(setup["corpus"], tmp_path / "plain", num_layers=2, hidden_dropout=0.2))
    _train(_student(setup, tmp_path / "kd", "--kd-alpha", "1", "--kd-temperature", "3",
                    hidden_dropout=0.2))
    assert _losses(tmp_path / "kd") == _losses(tmp_path / "plain")


def _teacher_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.adapter.teacher.state_dict().items()}


def test_teacher_frozen_and_absent_from_checkpoint(setup, tmp_path):
    from megapre.cli.flags import parse_config
    from megapre.train.checkpoint import load_checkpoint, resolve_checkpoint
    from megapre.train.loop import Trainer

    save = tmp_path / "save"
    trainer = Trainer(parse_config(_student(setup, tmp_path / "kd", *KD, "--save", str(save))))
    before = _teacher_state(trainer)
    teacher_params = {id(p) for p in trainer.model.adapter.teacher.parameters()}
    assert all(not p.requires_grad for p in trainer.model.adapter.teacher.parameters())
    assert not teacher_params & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    try:
        trainer.train()
    finally:
        trainer.close()
    after = _teacher_state(trainer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the student's checkpoint loads into a plain 2-layer GPT with no unused tensor
    plain = Trainer(parse_config(tiny_gpt_flags(setup["corpus"], tmp_path / "plain",
                                                num_layers=2)))
    try:
        load_checkpoint(resolve_checkpoint(str(save)), plain.model, None, plain.mesh,
                        load_rng=False, strictness="raise_all")
    finally:
        plain.close()


def test_resume_reloads_the_teacher(setup, tmp_path):
    whole = tmp_path / "whole"
    _train(_student(setup, whole, *KD, train_iters=4))
    part = tmp_path / "part"
    save = str(tmp_path / "ckpt")
    _train(_student(setup, part, *KD, "--save", save, "--exit-interval", "2", train_iters=4))
    _train(_student(setup, part, *KD, "--save", save, "--load", save, train_iters=4))
    flat = [[x for pair in _losses(out) for x in pair] for out in (part, whole)]
    assert flat[0] == pytest.approx(flat[1], rel=1e-6)  # (loss, grad norm) of every step


BAD = {
    "alpha": (("--kd-alpha", "1.5"), "--kd-alpha"),
    "temperature": (("--kd-temperature", "0"), "--kd-temperature"),
    "without teacher": (("--kd-alpha", "0.2"), "--teacher-checkpoint"),
    "hidden widths": (("--kd-hidden-weight", "1", "--hidden-size", "48"), "--kd-hidden-weight"),
    "vocab": (("--vocab-size", "45"), "has 40 tokens, the student's 46"),
    "missing": (("--teacher-checkpoint", "/nonexistent/teacher"), "--teacher-checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(setup, tmp_path, capsys, case):
    from megapre.cli.pretrain import main

    extra, needle = BAD[case]
    flags = _student(setup, tmp_path, *extra)
    if case == "without teacher":
        i = flags.index("--teacher-checkpoint")
        del flags[i:i + 2]
    assert main(flags) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_teacher_bf16_is_close_to_fp32(setup, tmp_path):
    _train(_student(setup, tmp_path / "fp32", *KD))
    _train(_student(setup, tmp_path / "bf16", *KD, "--teacher-bf16"))
    got, want = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp32")
    assert got != want  # the teacher really ran in bf16
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in want], rel=2e-2)


def test_megatron_spelling_of_the_teacher(setup, tmp_path, capsys):
    from megapre.cli.flags import parse_config
    from megapre.cli.pretrain import main

    flags = tiny_gpt_flags(setup["corpus"], tmp_path, "--export-kd-teacher-load",
                           setup["teacher"])
    assert parse_config(flags).distill.teacher_checkpoint == setup["teacher"]
    assert main([*flags, "--export-kd-cfg", "kd.yaml"]) == 2
    assert "--export-kd-cfg" in capsys.readouterr().err
