"""megapre-convert's Hugging Face door: GPT-2 and Llama models built from configs (random
weights, no downloads) come in with the transformers model's logits (<= 1e-4 relative) in TP1,
TP2 and PP2, the same one-batch loss and the same greedy continuation; they go back out bit for
bit, with tokenizer files AutoTokenizer reads; bad input is one line and leaves nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face door needs transformers "
                    "(pip install megapre[interop])")
pytest.importorskip("safetensors")

from conftest import SHARED_DATA  # noqa: E402
from hf_cases import open_checkpoint as _open  # noqa: E402
from hf_cases import bert_model, hf_dir, hf_model  # noqa: E402
from megapre.cli.convert import main as convert  # noqa: E402
from megapre.parallel.testing import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["gpt2", "llama"]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=KINDS)
def imported(request, tmp_path_factory):
    """(kind, transformers model, its directory, the imported checkpoint)."""
    kind = request.param
    work = tmp_path_factory.mktemp(kind)
    model = hf_dir(kind, work / "hf")
    assert convert(["hf-import", "--hf-dir", str(work / "hf"), "--save", str(work / "ckpt")]) == 0
    return kind, model, work / "hf", work / "ckpt"


def _ids(vocab: int, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(7))


def _layout_logits(rank: int, world: int, ckpt: str, tp: int, pp: int, ids: torch.Tensor):
    from megapre.inference.logprobs import TokenScorer

    torch.set_num_threads(1)
    rt = _open(Path(ckpt), tp, pp)
    try:
        return TokenScorer(rt.model).logits(ids)
    finally:
        rt.mesh.destroy()


def test_logits_match_transformers_in_one_process(imported):
    kind, model, _, ckpt = imported
    ids = _ids(model.config.vocab_size)
    rt = _open(ckpt)
    try:
        from megapre.inference.logprobs import TokenScorer
        ours = TokenScorer(rt.model).logits(ids)
    finally:
        rt.mesh.destroy()
    with torch.no_grad():
        ref = model(ids).logits
    assert ours.shape == ref.shape
    assert _relative(ours, ref) <= 1e-4, kind


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_logits_match_transformers_in_parallel_layouts(imported, tp, pp):
    kind, model, _, ckpt = imported
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
    got = [x for x in run_distributed(_layout_logits, 2, str(ckpt), tp, pp, ids, backend=None,
                                      timeout_s=300) if x is not None]
    assert got, "no rank returned logits"
    for logits in got:
        assert _relative(logits, ref) <= 1e-4, (kind, tp, pp)


def test_one_batch_loss_matches(imported):
    kind, model, _, ckpt = imported
    ids = _ids(model.config.vocab_size, seq=32)
    with torch.no_grad():
        ref = model(ids, labels=ids).loss
    rt = _open(ckpt)
    try:
        m = rt.model.models[0].eval()
        with torch.no_grad():
            per_token = m(input_ids=ids[:, :-1], labels=ids[:, 1:])
    finally:
        rt.mesh.destroy()
    assert float(per_token.float().mean()) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)


def test_greedy_generation_matches(imported):
    from megapre.inference.generator import TextGenerator
    from megapre.inference.sampling import SamplingConfig

    kind, model, _, ckpt = imported
    prompt = _ids(model.config.vocab_size, batch=1, seq=8)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                             eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    rt = _open(ckpt)
    try:
        gen = TextGenerator(rt.model, rt.tokenizer.vocab_size, rt.tokenizer.eod, 64)
        out = gen.generate([prompt[0].tolist()], 32, SamplingConfig(greedy=True), seed=0,
                           stop_at_eod=False)
    finally:
        rt.mesh.destroy()
    assert out[0].ids == ref, kind


def test_round_trips_are_bit_identical(imported, tmp_path):
    kind, model, _, ckpt = imported
    out = tmp_path / "out"
    assert convert(["hf-export", "--load", str(ckpt), "--hf-dir", str(out)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(out)
    ref = model.state_dict()
    got = back.state_dict()
    assert set(got) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor), name
    # megapre -> HF -> megapre: the same checkpoint weights again
    again = tmp_path / "again"
    assert convert(["hf-import", "--hf-dir", str(out), "--save", str(again)]) == 0
    a, b = _open(ckpt), None
    try:
        first = {n: p.detach().clone() for n, p in a.model.models[0].named_parameters()}
    finally:
        a.mesh.destroy()
    b = _open(again)
    try:
        for n, p in b.model.models[0].named_parameters():
            assert torch.equal(p.detach(), first[n]), n
    finally:
        b.mesh.destroy()
    tok = AutoTokenizer.from_pretrained(out)
    from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

    ours = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer",
                                           tokenizer_model=str(out / "tokenizer.json")))
    text = "to be or not to be, the quick brown fox"
    assert tok(text)["input_ids"] == list(ours.encode(text))


@pytest.mark.skipif(not (SHARED_DATA / "gpt2" / "vocab.json").is_file(),
                    reason="needs ../shared/data/gpt2 (GPT-2 BPE)")
def test_gpt2_bpe_vocab_files_round_trip(tmp_path):
    """GPT-2's own vocab.json + merges.txt: GPT2BPETokenizer in megapre, GPT2Tokenizer out."""
    shared = SHARED_DATA / "gpt2"
    hf = tmp_path / "hf"
    hf_model("gpt2", 50257).save_pretrained(hf)
    for name in ("vocab.json", "merges.txt"):
        (hf / name).write_bytes((shared / name).read_bytes())
    assert convert(["hf-import", "--hf-dir", str(hf), "--save", str(tmp_path / "ck")]) == 0
    cfg = json.loads(next((tmp_path / "ck").glob("iter_*/config.json")).read_text())
    assert cfg["data"]["tokenizer_type"] == "GPT2BPETokenizer"
    assert convert(["hf-export", "--load", str(tmp_path / "ck"), "--hf-dir",
                    str(tmp_path / "out")]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("Hello world")["input_ids"] == [15496, 995]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "megapre.convert", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_imported_llama_continues_pretraining_under_tp2(imported, tmp_path):
    kind, model, _, ckpt = imported
    if kind != "llama":
        pytest.skip("one family is enough for the training path")
    from conftest import write_counting_corpus

    data = write_counting_corpus(str(tmp_path / "count_text_document"), eod=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "megapre.pretrain", "--load", str(ckpt), "--finetune", "--use-checkpoint-args",
         "--tensor-model-parallel-size", "2", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-4", "--eval-iters", "0",
         "--data-path", data, "--split", "100,0,0", "--allow-tokenizer-mismatch",
         "--num-workers", "0", "--device", "cpu", "--log-interval", "1",
         "--data-cache-path", str(tmp_path / "cache"),
         "--metrics-path", str(tmp_path / "m.jsonl")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and "split" not in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


# -- bad input ------------------------------------------------------------------------------
def _fails(tmp_path: Path, hf: Path, needle: str, *extra: str) -> None:
    save = tmp_path / "ckpt"
    proc = _cli("hf-import", "--hf-dir", str(hf), "--save", str(save), *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not save.exists(), "a failed import left files behind"


def test_unsupported_architecture_names_the_supported(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "mistral",
                                                "architectures": ["MistralForCausalLM"]}))
    _fails(tmp_path, hf, "MistralForCausalLM")
    _fails(tmp_path, hf, "LlamaForCausalLM")


def test_missing_and_truncated_weights(tmp_path):
    hf = tmp_path / "hf"
    hf_dir("gpt2", hf)
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(tmp_path, hf, "model.safetensors")
    (hf / "model.safetensors").unlink()
    _fails(tmp_path, hf, "weights missing")


def test_tokenizer_of_another_size_is_refused(tmp_path):
    hf = tmp_path / "hf"
    hf_dir("llama", hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vocab_size"] += 3
    (hf / "config.json").write_text(json.dumps(cfg))
    _fails(tmp_path, hf, "must match")


def test_scaled_rope_is_refused_by_name(tmp_path):
    hf = tmp_path / "hf"
    hf_dir("llama", hf, tokenizer=False)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (hf / "config.json").write_text(json.dumps(cfg))
    _fails(tmp_path, hf, "'llama3'", "--null-tokenizer")


@pytest.mark.parametrize("key,value,needle", [
    ("hidden_act", "relu", "hidden_act 'relu'"),
    ("position_embedding_type", "relative_key", "'relative_key'"),
    ("type_vocab_size", 3, "type_vocab_size 3"),
    ("architectures", ["BertForSequenceClassification"], "BertForPreTraining")])
def test_unsupported_bert_settings_are_refused_by_name(tmp_path, key, value, needle):
    hf = tmp_path / "hf"
    bert_model("bert", 100).save_pretrained(hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg[key] = value
    (hf / "config.json").write_text(json.dumps(cfg))
    _fails(tmp_path, hf, needle, "--null-tokenizer")


def test_no_tokenizer_files_says_what_to_do(tmp_path):
    hf = tmp_path / "hf"
    hf_dir("gpt2", hf, tokenizer=False)
    _fails(tmp_path, hf, "--null-tokenizer")


def test_existing_destination_is_left_alone(tmp_path):
    hf = tmp_path / "hf"
    hf_dir("gpt2", hf, tokenizer=False)
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    proc = _cli("hf-import", "--hf-dir", str(hf), "--save", str(save), "--null-tokenizer",
                cwd=tmp_path)
    assert proc.returncode == 2 and "already holds files" in proc.stderr
    assert (save / "keep.txt").read_text() == "mine"


def test_export_replaces_its_output_only_when_complete(imported, tmp_path):
    kind, model, _, ckpt = imported
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    proc = _cli("hf-export", "--load", str(ckpt), "--hf-dir", str(out), "--dtype", "bf16",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    bad = _cli("hf-export", "--load", str(tmp_path / "nowhere"), "--hf-dir", str(out),
               cwd=tmp_path)
    assert bad.returncode == 2 and (out / "model.safetensors").is_file()


def test_sharded_directories_write_and_read_back(tmp_path):
    """Shards are written one at a time with transformers' names and index, and read back."""
    from megapre.convert import hf_files

    tensors = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(5)}
    hf_files.write_dir(tmp_path / "out", {"config.json": b"{}"}, tensors.items(),
                       shard_bytes=3 * 64 * 64 * 4)
    index = json.loads((tmp_path / "out" / hf_files.INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not list((tmp_path / "out").glob("*.part"))
    reader = hf_files.WeightReader(tmp_path / "out", ("",))
    for name, t in tensors.items():
        assert torch.equal(reader.take(name), t)
    assert reader.unused() == []
