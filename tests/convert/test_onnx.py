"""megapre-convert onnx: tiny checkpoints exported, run in ONNX Runtime at batch/sequence sizes
other than the traced ones (dynamic axes), and held to megapre's eager forward (fused kernels)
within 1e-4 relative (max |diff| / max |logits|, fp32): GPT with learned positions and the
Llama-style variant (RoPE, SwiGLU, RMSNorm, GQA) and an ALBERT-style one (shared layers, a
factorized embedding), each also with a KV cache (prompt on an empty
past, then one step on the returned present; and a left-padded batch); BERT's masked-LM +
binary logits (pre-LN, and post-LN with the exact GELU); fine-tuned BERT and GPT classifiers.
Bad input is one line and exit 2."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="megapre-convert onnx needs onnx (pip install megapre[onnx])")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript "
                                         "(pip install megapre[onnx])")
ort = pytest.importorskip("onnxruntime", reason="the parity checks run in onnxruntime "
                                                "(pip install megapre[onnx])")

from conftest import (bert_args, tiny_gpt_flags, write_bert_corpus,  # noqa: E402
                      write_counting_corpus)
from conftest import train_in_process as _train  # noqa: E402

from megapre.cli import convert as convert_cli  # noqa: E402
from megapre.convert import onnx as onnx_export  # noqa: E402
from megapre.inference import checkpoint_io  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
TOLERANCE = 1e-4
SIZES = ((3, 7), (1, 13))  # the graphs are traced at batch 2, sequence 5 (past 3)
LLAMA = ("--position-embedding-type", "rope", "--swiglu", "--normalization", "RMSNorm",
         "--group-query-attention", "--num-query-groups", "2", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights")
ALBERT = ("--share-layers-every", "2", "--embedding-size", "16")


@pytest.fixture(scope="module")
def gpt_ckpts(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("onnx_gpt")
    corpus = write_counting_corpus(str(work / "count_text_document"))
    out = {}
    for name, extra in (("learned", ()), ("llama", LLAMA), ("albert", ALBERT)):
        out[name] = work / name
        _train(tiny_gpt_flags(corpus, work, "--save", str(out[name]), *extra, train_iters=2))
    return out


@pytest.fixture(scope="module")
def bert_ckpts(tmp_path_factory) -> dict[str, Path]:
    from finetune_cases import flags, pretrain, write_task

    from megapre.cli import finetune as finetune_cli

    work = tmp_path_factory.mktemp("onnx_bert")
    task = {"pre": pretrain(work, 1234), "train": write_task(work / "train.tsv", 32, 1),
            "valid": write_task(work / "valid.tsv", 8, 2),
            "test": write_task(work / "test.tsv", 8, 3)}
    assert finetune_cli.main(flags(task, work / "ft", "--train-iters", "2")) == 0
    post = work / "post"  # the original BERT's block: post-LN, exact GELU
    _train(bert_args(write_bert_corpus(work), work / "cache") +
           ["--save", str(post), "--post-layernorm", "--erf-gelu"])
    return {"pre": task["pre"], "ft": work / "ft", "post": post}


def _export(ckpt: Path, out: Path, *flags: str) -> ort.InferenceSession:
    assert convert_cli.main(["onnx", "--load", str(ckpt), "--output", str(out), *flags]) == 0
    import onnx
    import onnx_ir

    assert onnx_export.custom_domains(onnx_ir.load(str(out))) == set()
    proto = onnx.load(str(out))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert "Softmax" in {n.op_type for n in proto.graph.node}
    return ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def _rel(got: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().float().numpy()
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _ids(vocab: int, b: int, s: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["learned", "llama", "albert"])
def test_gpt_logits_match_eager(gpt_ckpts, tmp_path, variant):
    out = tmp_path / "gpt.onnx"
    out.write_bytes(b"an older file, replaced once the export is complete")
    sess = _export(gpt_ckpts[variant], out)
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    assert [p.name for p in tmp_path.iterdir()] == ["gpt.onnx"]  # no temporary left behind
    with onnx_export.loaded(checkpoint_io.resolve(str(gpt_ckpts[variant])), False) as (
            model, _, vocab, _):
        for seed, (b, s) in enumerate(SIZES):
            ids = _ids(vocab, b, s, seed)
            with torch.no_grad():
                ref = model.gathered_logits(model(ids))
            assert ref.shape == (b, s, vocab)
            got = sess.run(None, {"input_ids": ids.numpy()})[0]
            assert _rel(got, ref) <= TOLERANCE


@pytest.mark.parametrize("variant", ["learned", "llama", "albert"])
def test_gpt_kv_cache_prompt_then_step(gpt_ckpts, tmp_path, variant):
    sess = _export(gpt_ckpts[variant], tmp_path / "kv.onnx", "--with-kv-cache")
    inputs, outputs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
    assert [i.name for i in inputs][:4] == ["input_ids", "attention_mask", "past_key.0",
                                            "past_value.0"]
    assert outputs[:3] == ["logits", "present_key.0", "present_value.0"]
    groups = 2 if variant == "llama" else 4
    assert inputs[2].shape == ["batch", groups, "past_sequence", 8]
    with onnx_export.loaded(checkpoint_io.resolve(str(gpt_ckpts[variant])), False) as (
            model, _, vocab, _):
        for seed, (b, s) in enumerate(SIZES):
            ids = _ids(vocab, b, s + 1, seed)
            with torch.no_grad():
                ref = model.gathered_logits(model(ids))
            got = _prompt_then_step(sess, ids, torch.zeros(b, dtype=torch.long), groups)
            assert got[1].shape == (b, groups, s + 1, 8)  # the present after the step
            assert _rel(got[0], ref) <= TOLERANCE
        # a left-padded batch (as batched generation feeds it): each sample's real tokens
        # give the logits of that sample alone
        ids, pads = _ids(vocab, 2, 7, 5), torch.tensor([0, 3])
        got = _prompt_then_step(sess, ids, pads, groups)[0]
        for i, pad in enumerate(pads.tolist()):
            with torch.no_grad():
                ref = model.gathered_logits(model(ids[i:i + 1, pad:]))
            assert _rel(got[i:i + 1, pad:], ref) <= TOLERANCE


def _prompt_then_step(sess, ids: torch.Tensor, pads: torch.Tensor, groups: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Logits of ids [b, s + 1] fed as a prompt of s tokens (on an empty past; sample i
    left-padded by pads[i]) and one step on the returned present; also that present's
    present_key.0."""
    b, s = ids.shape[0], ids.shape[1] - 1
    mask = (torch.arange(s + 1)[None] >= pads[:, None]).long()
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros((b, groups, 0, 8), np.float32) for i in sess.get_inputs()[2:]}
    first = sess.run(None, {"input_ids": ids[:, :s].numpy(),
                            "attention_mask": mask[:, :s].numpy(), **past})
    past = {n.replace("present", "past"): t for n, t in zip(names[1:], first[1:])}
    step = sess.run(None, {"input_ids": ids[:, s:].numpy(), "attention_mask": mask.numpy(),
                           **past})
    return np.concatenate([first[0], step[0]], axis=1), step[1]


@pytest.mark.parametrize("variant", ["pre", "post"])
def test_bert_masked_lm_and_binary_logits(bert_ckpts, tmp_path, variant):
    sess = _export(bert_ckpts[variant], tmp_path / "bert.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask",
                                                   "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "binary_logits"]
    with onnx_export.loaded(checkpoint_io.resolve(str(bert_ckpts[variant])), False) as (
            model, _, vocab, _):
        for seed, (b, s) in enumerate(SIZES):
            ids, types, mask = _bert_batch(vocab, b, s, seed)
            with torch.no_grad():
                logits, binary = model(ids, types, padding_mask=mask == 0)
            got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                  "token_type_ids": types.numpy()})
            assert _rel(got[0], logits.transpose(0, 1)[..., :vocab]) <= TOLERANCE
            assert _rel(got[1], binary) <= TOLERANCE


def _bert_batch(vocab: int, b: int, s: int, seed: int):
    """ids, token types (second half 1) and a mask with the last sample right-padded."""
    ids = _ids(vocab, b, s, seed)
    types = torch.zeros_like(ids)
    types[:, s // 2:] = 1
    mask = torch.ones_like(ids)
    mask[-1, s - 2:] = 0
    return ids, types, mask


@pytest.mark.parametrize("flags", [(), ("--task-head",)])
def test_finetuned_classifier_logits(bert_ckpts, tmp_path, flags):
    sess = _export(bert_ckpts["ft"], tmp_path / "cls.onnx", *flags)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    with onnx_export.loaded(checkpoint_io.resolve(str(bert_ckpts["ft"])), True) as (
            model, _, vocab, _):
        for seed, (b, s) in enumerate(SIZES):
            ids, types, mask = _bert_batch(vocab, b, s, seed)
            with torch.no_grad():
                ref = model(ids, types, padding_mask=mask == 0, lengths=mask.sum(-1))
            got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                  "token_type_ids": types.numpy()})[0]
            assert got.shape == (b, 2)
            assert _rel(got, ref) <= TOLERANCE


@pytest.fixture(scope="module")
def gpt_classifier(gpt_ckpts, tmp_path_factory) -> Path:
    """A fine-tuned GPT classifier ("last" pooling) on ids-as-text rows."""
    import json
    import random

    from megapre.cli import finetune as finetune_cli

    work = tmp_path_factory.mktemp("onnx_gpt_cls")
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        ids = [rng.randrange(39) for _ in range(rng.randint(2, 9))]
        rows.append(json.dumps({"sentence": " ".join(map(str, ids)),
                                "label": "high" if sum(ids) > 19 * len(ids) else "low"}))
    (work / "train.jsonl").write_text("\n".join(rows) + "\n")
    out = work / "ft"
    assert finetune_cli.main(["--pretrained-checkpoint", str(gpt_ckpts["learned"]),
                              "--train-data", str(work / "train.jsonl"), "--train-iters", "2",
                              "--micro-batch-size", "4", "--lr", "1e-3", "--device", "cpu",
                              "--save", str(out), "--metrics-path",
                              str(work / "metrics.jsonl")]) == 0
    return out


def test_finetuned_gpt_classifier_pools_the_last_real_token(gpt_classifier, tmp_path):
    sess = _export(gpt_classifier, tmp_path / "cls.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    with onnx_export.loaded(checkpoint_io.resolve(str(gpt_classifier)), True) as (
            model, _, vocab, _):
        for seed, (b, s) in enumerate(SIZES):
            ids, _, mask = _bert_batch(vocab, b, s, seed)
            with torch.no_grad():
                ref = model(ids, lengths=mask.sum(-1))
            got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            assert got.shape == (b, 2)
            assert _rel(got, ref) <= TOLERANCE


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    assert convert_cli.main(["onnx", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_one_line(gpt_ckpts, bert_ckpts, tmp_path, capsys):
    gpt, out = str(gpt_ckpts["learned"]), tmp_path / "m.onnx"
    _one_line_error(capsys, ["--load", str(tmp_path / "nope"), "--output", str(out)],
                    "--load", "nope")
    _one_line_error(capsys, ["--load", gpt, "--output", str(tmp_path / "no" / "m.onnx")],
                    "--output", "does not exist")
    _one_line_error(capsys, ["--load", gpt, "--output", str(tmp_path)], "is a directory")
    _one_line_error(capsys, ["--load", gpt, "--output", str(out), "--opset", "17"], "--opset")
    _one_line_error(capsys, ["--load", str(bert_ckpts["pre"]), "--output", str(out),
                             "--with-kv-cache"], "--with-kv-cache", "BERT")
    _one_line_error(capsys, ["--load", gpt, "--output", str(out), "--task-head"],
                    "--task-head", "pretraining checkpoint")
    assert not out.exists()


def test_unwritable_output_directory(gpt_ckpts, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    # root writes anywhere: stand in for a read-only directory through the check itself
    monkeypatch.setattr(onnx_export.os, "access", lambda path, mode: Path(path) != locked)
    _one_line_error(capsys, ["--load", str(gpt_ckpts["learned"]), "--output",
                             str(locked / "m.onnx")], "not writable")
