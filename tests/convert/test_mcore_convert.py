"""megapre-convert mcore-import: megatron-core GPT models (GPT-2-like: LayerNorm, learned
positions, biases, tanh GELU, tied; Llama-like: RMSNorm, SwiGLU, RoPE, GQA, untied, no biases)
saved by megatron-core itself (torch_dist, and the legacy model_optim_rng.pt, also split over
tensor- and pipeline-parallel ranks) come in with megatron-core's logits (<= 1e-4 relative) in
TP1, TP2 and PP2; bad input is one line (exit 2) and leaves nothing behind; `megapre.pretrain
--load` on a Megatron-LM directory says how to convert it."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="the reference checkpoints are made by megatron-core")
pytest.importorskip("psutil", reason="megatron-core's checkpoint writer needs psutil (without it "
                    "dist_checkpointing.save hangs)")

import mcore_cases  # noqa: E402
from megapre.cli.convert import main as convert  # noqa: E402
from megapre.parallel.testing import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def megatron(request, tmp_path_factory):
    """(kind, directory with torch_dist/, legacy/ and reference.pt), made in a subprocess."""
    out = tmp_path_factory.mktemp(f"mcore_{request.param}")
    subprocess.run([sys.executable, str(HERE / "mcore_cases.py"), str(out), request.param],
                   check=True, cwd=ROOT, timeout=300, capture_output=True)
    return request.param, out


def _import(src: Path, save: Path, *extra: str) -> Path:
    assert convert(["mcore-import", "--load", str(src), "--save", str(save), *extra]) == 0
    return save


def _logits(rank: int, world: int, ckpt: str, tp: int, pp: int, ids: torch.Tensor):
    from megapre.inference import checkpoint_io
    from megapre.inference.logprobs import TokenScorer
    from megapre.train.runtime import build_runtime

    torch.set_num_threads(1)
    path = checkpoint_io.resolve(ckpt)
    cfg = checkpoint_io.saved_config(path)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.train.device = "cpu"
    rt = build_runtime(cfg)
    try:
        checkpoint_io.load_weights(path, rt)
        return TokenScorer(rt.model).logits(ids)
    finally:
        rt.mesh.destroy()


def _check(ckpt: Path, ref_dir: Path, tp: int = 1, pp: int = 1) -> None:
    ref = torch.load(ref_dir / "reference.pt")
    if tp * pp == 1:
        got = [_logits(0, 1, str(ckpt), 1, 1, mcore_cases.ids())]
    else:
        got = [x for x in run_distributed(_logits, tp * pp, str(ckpt), tp, pp, mcore_cases.ids(),
                                          backend=None, timeout_s=300) if x is not None]
    assert got, "no rank returned logits"
    for logits in got:
        assert logits.shape == ref.shape
        assert _relative(logits, ref) <= 1e-4, (ckpt, tp, pp)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch_dist", "legacy"])
def test_logits_match_megatron_core(megatron, fmt, tmp_path):
    kind, out = megatron
    ckpt = _import(out / fmt, tmp_path / "ckpt")
    _check(ckpt, out)
    from megapre.convert.hf import saved_model_args

    m = saved_model_args(ckpt)
    assert m["swiglu"] == (kind == "llama") and m["num_layers"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_logits_match_in_parallel_layouts(megatron, tp, pp, tmp_path):
    kind, out = megatron
    _check(_import(out / "torch_dist", tmp_path / "ckpt"), out, tp, pp)


def _tp_shards(model: dict, tp: int, glu: bool) -> list[dict]:
    """A state as Megatron-LM's TP ranks hold it: column-parallel rows split (a GLU fc1 per rank
    [gate_shard; up_shard]), row-parallel columns split, the rest replicated."""
    shards: list[dict] = [{} for _ in range(tp)]
    for key, t in model.items():
        if not isinstance(t, torch.Tensor):
            parts = [t] * tp
        elif key.endswith(("linear_fc1.weight", "linear_fc1.bias")) and glu:
            gate, up = t.chunk(2, 0)
            parts = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp, 0), up.chunk(tp, 0))]
        elif key.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight",
                           "linear_fc1.bias", "word_embeddings.weight", "output_layer.weight")):
            parts = list(t.chunk(tp, 0))
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            parts = list(t.chunk(tp, 1))
        else:
            parts = [t] * tp
        for shard, part in zip(shards, parts):
            shard[key] = part.clone() if isinstance(part, torch.Tensor) else part
    return shards


def _chunks(model: dict, n: int, layers: int) -> list[dict]:
    """The model cut into n runs of layers, each numbered from 0; the embedding in the first,
    the head in the last."""
    per = layers // n
    chunks: list[dict] = [{} for _ in range(n)]
    for key, t in model.items():
        if key.startswith("decoder.layers."):
            i, rest = key[len("decoder.layers."):].split(".", 1)
            chunks[int(i) // per][f"decoder.layers.{int(i) % per}.{rest}"] = t
        else:
            chunks[0 if key.startswith("embedding.") else -1][key] = t
    return chunks


def _split(src: Path, dest: Path, tp: int, pp: int, glu: bool, vp: int = 1) -> None:
    """The TP1 legacy file rewritten as Megatron-LM's mp_rank_TT[_PPP] files; with virtual
    stages (vp > 1) stage p holds chunks p, p + pp, ... as model0, model1, ..."""
    from megapre.convert.mcore_files import load_pickle

    state = load_pickle(src / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt")
    chunks = _chunks(state.pop("model"), pp * vp, state["args"].num_layers)
    for p in range(pp):
        mine = [_tp_shards(chunks[v * pp + p], tp, glu) for v in range(vp)]
        for t in range(tp):
            d = dest / "iter_0000005" / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            d.mkdir(parents=True)
            models = {"model": mine[0][t]} if vp == 1 else \
                {f"model{v}": mine[v][t] for v in range(vp)}
            torch.save({**state, **models}, d / "model_optim_rng.pt")
    (dest / "latest_checkpointed_iteration.txt").write_text("5")


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_legacy_parallel_files_are_joined(megatron, tp, pp, tmp_path):
    kind, out = megatron
    _split(out / "legacy", tmp_path / "split", tp, pp, glu=kind == "llama")
    _check(_import(tmp_path / "split", tmp_path / "ckpt"), out)


@pytest.mark.slow
def test_legacy_virtual_pipeline_chunks_are_interleaved(megatron, tmp_path, capsys):
    """--num-layers-per-virtual-pipeline-stage: each stage file holds model0, model1 (chunks
    p and p + pp of the layers)."""
    kind, out = megatron
    _split(out / "legacy", tmp_path / "split", 2, 2, glu=kind == "llama", vp=2)
    _check(_import(tmp_path / "split", tmp_path / "ckpt"), out)
    capsys.readouterr()
    from megapre.convert.mcore_files import load_pickle

    for rank in ("mp_rank_00_001", "mp_rank_01_001"):  # the last stage lost its second chunk
        f = tmp_path / "split" / "iter_0000005" / rank / "model_optim_rng.pt"
        state = load_pickle(f)
        del state["model1"]
        torch.save(state, f)
    _fails(capsys, tmp_path, tmp_path / "split", "different numbers of virtual stages")


def _legacy_with(tmp_path: Path, name: str, **changes) -> Path:
    """A hand-built legacy checkpoint (random weights, GPT-2-like args) with `changes` to its
    args; tensors are what the args describe."""
    a = mcore_cases.megatron_args("gpt2")
    for k, v in changes.items():
        setattr(a, k, v)
    root = tmp_path / name
    d = root / "iter_0000005" / "mp_rank_00"
    d.mkdir(parents=True)
    torch.save({"args": a, "iteration": 5, "checkpoint_version": 3.0,
                "model": {"embedding.word_embeddings.weight": torch.zeros(128, 64)}},
               d / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    return root


def _fails(capsys, tmp_path: Path, load: Path, match: str, *extra: str) -> None:
    save = tmp_path / "out"
    assert convert(["mcore-import", "--load", str(load), "--save", str(save), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not save.exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    unknown = tmp_path / "unknown" / "iter_0000005"
    unknown.mkdir(parents=True)
    (unknown.parent / "latest_checkpointed_iteration.txt").write_text("5")
    _fails(capsys, tmp_path, unknown.parent, "unknown checkpoint format")
    (unknown / "meta.json").write_text("{}")
    _fails(capsys, tmp_path, unknown.parent, "a megapre checkpoint already")
    (unknown / "meta.json").unlink()
    _fails(capsys, tmp_path, tmp_path / "unknown", "no iteration 7", "--iteration", "7")
    (unknown.parent / "latest_checkpointed_iteration.txt").write_text("9")
    _fails(capsys, tmp_path, unknown.parent, "iter_0000009 is missing")
    moe = _legacy_with(tmp_path, "moe", num_experts=8)
    _fails(capsys, tmp_path, moe, "mixture of experts")
    mla = _legacy_with(tmp_path, "mla", multi_latent_attention=True)
    _fails(capsys, tmp_path, mla, "multi-latent attention")
    post = _legacy_with(tmp_path, "post", apply_residual_connection_post_layernorm=True)
    _fails(capsys, tmp_path, post, "apply_residual_connection_post_layernorm")
    f = moe / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[:200])  # truncated
    _fails(capsys, tmp_path, moe, "unreadable")
    partial = _legacy_with(tmp_path, "partial")
    _fails(capsys, tmp_path, partial, "no weights for")
    _fails(capsys, tmp_path, partial, "the tokenizer has 501 tokens", "--vocab-size", "500")
    moved = _legacy_with(tmp_path, "moved", tokenizer_type="GPT2BPETokenizer",
                         vocab_file="/nonexistent/vocab.json", merge_file="/nonexistent/m.txt")
    _fails(capsys, tmp_path, moved, "give --vocab-file PATH")


def test_pickled_code_is_never_run(tmp_path, capsys):
    """A class or function other than argparse.Namespace in the pickle becomes an inert
    stand-in; what torch's loader blocks outright (os, sys, ...) is a one-line error."""
    root = _legacy_with(tmp_path, "evil")
    f = root / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(), "model": {}, "x": _Boom(tmp_path / "boom")}, f)
    from megapre.convert.mcore_files import load_pickle

    state = load_pickle(f)
    assert type(state["x"]).__name__ == "_Inert"
    assert state["x"].args == (__file__, str(tmp_path / "boom")) and \
        not (tmp_path / "boom").exists()
    torch.save({"args": argparse.Namespace(), "model": {}, "x": _System()}, f)
    _fails(capsys, tmp_path, root, "blocked")


class _Boom:
    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def __reduce__(self):
        return (shutil.copyfile, (__file__, str(self.dest)))


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.slow
def test_torch_dist_truncated_and_missing_args(megatron, tmp_path, capsys):
    kind, out = megatron
    if kind != "gpt2":
        pytest.skip("one model is enough")
    bad = tmp_path / "bad"
    shutil.copytree(out / "torch_dist", bad)
    for f in (bad / "iter_0000005").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    _fails(capsys, tmp_path, bad, "cannot read the tensors")
    noargs = tmp_path / "noargs"
    shutil.copytree(out / "torch_dist", noargs)
    torch.save({}, noargs / "iter_0000005" / "common.pt")
    _fails(capsys, tmp_path, noargs, "no run args")


def _launch_flags(a: argparse.Namespace) -> str:
    """The launch-script flags that make Megatron-LM save args `a`."""
    negative = {"add_bias_linear": "--disable-bias-linear",
                "bias_gelu_fusion": "--no-bias-gelu-fusion"}
    skip = {"iteration", "ckpt_format", "params_dtype", "padded_vocab_size", "num_experts"}
    words = []
    for key, value in vars(a).items():
        flag = "--" + key.replace("_", "-")
        if key in skip or value is None:
            continue
        if value is False:
            words += [negative[key]] if key in negative else []
        elif value is True:
            words.append(flag)
        else:
            words += [flag, str(value)]
    return " ".join(words)


def test_megatron_args_parse_like_megatron():
    from megapre.convert.mcore import parse_megatron_args

    got = parse_megatron_args("--num-layers 24 --norm-epsilon 1e-6 --swiglu "
                              "--disable-bias-linear --no-bias-gelu-fusion --normalization "
                              "RMSNorm --lr -3 --data-path '/a b/c'")
    assert got == {"num_layers": 24, "norm_epsilon": 1e-6, "swiglu": True,
                   "add_bias_linear": False, "bias_gelu_fusion": False,
                   "normalization": "RMSNorm", "lr": -3, "data_path": "/a b/c"}


@pytest.mark.slow
def test_model_only_save_imports_with_launch_flags(megatron, tmp_path, capsys):
    """megatron-core's dist_checkpointing outside Megatron-LM's loop stores no args: the launch
    flags describe the model instead, and the logits still match."""
    kind, out = megatron
    noargs = tmp_path / "noargs"
    shutil.copytree(out / "torch_dist", noargs)
    torch.save({}, noargs / "iter_0000005" / "common.pt")
    flags = _launch_flags(mcore_cases.megatron_args(kind))
    ckpt = _import(noargs, tmp_path / "ckpt", "--megatron-args", flags)
    _check(ckpt, out)
    capsys.readouterr()
    _fails(capsys, tmp_path, noargs, "--megatron-args")
    _fails(capsys, tmp_path, noargs, "'num-layers' is not a --flag", "--megatron-args",
           "num-layers 2 --hidden-size 64")


def test_pretrain_load_names_the_conversion(tmp_path, capsys):
    from conftest import tiny_gpt_flags, write_counting_corpus
    from megapre.cli.pretrain import main as pretrain

    root = _legacy_with(tmp_path, "megatron")
    base = tiny_gpt_flags(write_counting_corpus(tmp_path / "count_text_document"), tmp_path)
    for flag, where in (("--load", root), ("--load", root / "iter_0000005"),
                        ("--finetune", root)):
        extra = [flag, str(where)] if flag == "--load" else ["--load", str(where), "--finetune"]
        assert pretrain(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and "Megatron-LM" in err[-1] and "megapre-convert mcore-import" in err[-1], err


@pytest.mark.slow
def test_export_loads_in_megatron_core_and_imports_back(megatron, tmp_path):
    """megapre -> torch_dist through megatron-core's own save: megatron-core loads it with the
    original logits, and mcore-import reads back the same weights bit for bit."""
    kind, out = megatron
    first = _import(out / "torch_dist", tmp_path / "first")
    exported = tmp_path / "megatron"
    subprocess.run([sys.executable, "-m", "megapre.convert", "mcore-export", "--load", str(first),
                    "--save", str(exported)], check=True, cwd=ROOT, timeout=300,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    subprocess.run([sys.executable, str(HERE / "mcore_cases.py"), str(tmp_path), kind,
                    str(exported)], check=True, cwd=ROOT, timeout=300, capture_output=True)
    ref = torch.load(out / "reference.pt")
    assert _relative(torch.load(tmp_path / "loaded.pt"), ref) <= 1e-6
    again = _import(exported, tmp_path / "again")
    from megapre.inference import checkpoint_io

    a, b = (checkpoint_io.resolve(str(p)) for p in (first, again))
    _check(again, out)
    assert _weights(a) == _weights(b)


@pytest.mark.slow
def test_exact_gelu_comes_in_and_goes_out(tmp_path):
    """megatron-core without the fused bias-GELU applies the exact (erf) GELU: it imports as
    --erf-gelu with megatron-core's logits and exports back to the same model."""
    out = tmp_path / "ref"
    out.mkdir()
    subprocess.run([sys.executable, str(HERE / "mcore_cases.py"), str(out), "gpt2-erf"],
                   check=True, cwd=ROOT, timeout=300, capture_output=True)
    ckpt = _import(out / "torch_dist", tmp_path / "ckpt")
    from megapre.convert.hf import saved_model_args

    assert saved_model_args(ckpt)["erf_gelu"] is True
    _check(ckpt, out)
    exported = tmp_path / "megatron"
    subprocess.run([sys.executable, "-m", "megapre.convert", "mcore-export", "--load", str(ckpt),
                    "--save", str(exported)], check=True, cwd=ROOT, timeout=300,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    subprocess.run([sys.executable, str(HERE / "mcore_cases.py"), str(tmp_path), "gpt2-erf",
                    str(exported)], check=True, cwd=ROOT, timeout=300, capture_output=True)
    assert _relative(torch.load(tmp_path / "loaded.pt"), torch.load(out / "reference.pt")) <= 1e-6


def _weights(path: Path) -> dict:
    from megapre.inference import checkpoint_io
    from megapre.train.runtime import build_runtime

    cfg = checkpoint_io.saved_config(path)
    cfg.train.device = "cpu"
    rt = build_runtime(cfg)
    try:
        checkpoint_io.load_weights(path, rt)
        return {n: p.detach().clone().numpy().tobytes()
                for n, p in rt.model.models[0].named_parameters()}
    finally:
        rt.mesh.destroy()


def test_export_refuses_an_existing_directory(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    assert convert(["mcore-export", "--load", str(tmp_path / "missing"), "--save",
                    str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (tmp_path / "out" / "x").read_text() == "keep"
