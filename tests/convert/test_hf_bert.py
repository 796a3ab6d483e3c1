"""megapre-convert's BERT families: MegatronBert (pre-LN) and the original BERT (post-LN, megapre's
--post-layernorm), built from configs with random weights, come in with transformers' masked-LM
and next-sentence logits (<= 1e-4 relative) in TP1, TP2 and PP2 and the same pretraining loss;
they go back out bit for bit (*ForPreTraining and *ForMaskedLM), with tokenizer files
AutoTokenizer reads (tokenizer.json, or BERT's vocab.txt)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the Hugging Face door needs transformers "
                    "(pip install megapre[interop])")
pytest.importorskip("safetensors")

from conftest import SHARED_DATA  # noqa: E402
from hf_cases import open_checkpoint as _open  # noqa: E402
from hf_cases import BERT_KINDS, bert_dir, bert_model  # noqa: E402
from megapre.cli.convert import main as convert  # noqa: E402
from megapre.parallel.testing import run_distributed  # noqa: E402

BERT_VOCAB = SHARED_DATA / "bert"
pytestmark = pytest.mark.skipif(not (BERT_VOCAB / "tokenizer.json").is_file(),
                                reason="needs ../shared/data/bert (bert-base-uncased WordPiece)")
SEQ, PAD = 24, 6  # the second sample ends in PAD padding tokens


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=BERT_KINDS)
def imported(request, tmp_path_factory):
    """(kind, transformers *ForPreTraining model, the imported checkpoint)."""
    kind = request.param
    work = tmp_path_factory.mktemp(kind)
    model = bert_dir(kind, work / "hf", BERT_VOCAB)
    assert convert(["hf-import", "--hf-dir", str(work / "hf"), "--save", str(work / "ckpt")]) == 0
    return kind, model, work / "ckpt"


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two sentence pairs (token types 0 then 1), the second padded at the end."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    types = (torch.arange(SEQ)[None] >= SEQ // 2).long().expand(2, SEQ).clone()
    real = torch.ones(2, SEQ, dtype=torch.long)
    real[1, -PAD:] = 0
    return {"ids": ids, "types": types * real, "real": real}


def _reference(model, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        out = model(b["ids"], token_type_ids=b["types"], attention_mask=b["real"])
    if hasattr(out, "prediction_logits"):
        return out.prediction_logits, out.seq_relationship_logits
    return out.logits, None


def _logits(rt, b: dict[str, torch.Tensor]):
    """Walk the pipeline stages: (MLM logits [b, s, vocab], NSP logits [b, 2] or None) on the
    last stage's TP rank 0, None elsewhere."""
    from megapre.model.lm_head import full_logits
    from megapre.parallel.p2p import recv_tensor, send_tensor

    mesh, m = rt.mesh, rt.model.models[0].eval()
    hidden = None if mesh.is_first_stage else recv_tensor(mesh.pp_ranks[mesh.pp_rank - 1],
                                                          mesh.device)
    with torch.no_grad():
        x = m(input_ids=b["ids"], tokentype_ids=b["types"], padding_mask=b["real"] == 0,
              hidden_states=hidden)
    if not mesh.is_last_stage:
        send_tensor(x, mesh.pp_ranks[mesh.pp_rank + 1])
        return None
    logits, binary = x
    full = full_logits(logits, mesh, rt.tokenizer.vocab_size)
    return (full, binary) if mesh.tp_rank == 0 else None


def _layout_logits(rank: int, world: int, ckpt: str, tp: int, pp: int, b: dict):
    torch.set_num_threads(1)
    rt = _open(Path(ckpt), tp, pp)
    try:
        return _logits(rt, b)
    finally:
        rt.mesh.destroy()


def _check(got, ref, b: dict[str, torch.Tensor], what) -> None:
    """MLM logits of the real positions and the NSP logits within 1e-4 relative."""
    real = b["real"].bool()
    assert got[0].shape == ref[0].shape, what
    assert _relative(got[0][real], ref[0][real]) <= 1e-4, what
    if ref[1] is not None:
        assert _relative(got[1], ref[1]) <= 1e-4, what


def test_logits_match_transformers_in_one_process(imported):
    kind, model, ckpt = imported
    b = _batch(model.config.vocab_size)
    rt = _open(ckpt)
    try:
        got = _logits(rt, b)
    finally:
        rt.mesh.destroy()
    _check(got, _reference(model, b), b, kind)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_logits_match_transformers_in_parallel_layouts(imported, tp, pp):
    kind, model, ckpt = imported
    b = _batch(model.config.vocab_size)
    ref = _reference(model, b)
    got = [x for x in run_distributed(_layout_logits, 2, str(ckpt), tp, pp, b, backend=None,
                                      timeout_s=300) if x is not None]
    assert len(got) == 1, "one rank (last stage, TP rank 0) returns logits"
    _check(got[0], ref, b, (kind, tp, pp))


def test_pretraining_loss_matches(imported):
    """transformers' BertForPreTraining loss (masked-LM mean + next-sentence) equals megapre's
    training loss, computed at the predicted positions only (the pretraining path)."""
    kind, model, ckpt = imported
    b = _batch(model.config.vocab_size)
    g = torch.Generator().manual_seed(3)
    predicted = (torch.rand(2, SEQ, generator=g) < 0.3) & b["real"].bool()
    predicted[:, 1] = True
    targets = torch.randint(0, model.config.vocab_size, (2, SEQ), generator=g)
    nsp = torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(b["ids"], token_type_ids=b["types"], attention_mask=b["real"],
                    labels=torch.where(predicted, targets, -100), next_sentence_label=nsp).loss
    rt = _open(ckpt)
    try:
        with torch.no_grad():
            per_token, binary = rt.model.models[0].eval()(
                input_ids=b["ids"], tokentype_ids=b["types"], padding_mask=b["real"] == 0,
                labels=torch.where(predicted, targets, 0), predicted=predicted)
    finally:
        rt.mesh.destroy()
    ours = per_token[predicted].mean() + F.cross_entropy(binary, nsp)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    rt = _open(ckpt)
    try:
        return {n: p.detach().clone() for n, p in rt.model.models[0].named_parameters()}
    finally:
        rt.mesh.destroy()


def _same_state(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor), name


def test_round_trips_are_bit_identical(imported, tmp_path):
    kind, model, ckpt = imported
    out = tmp_path / "out"
    assert convert(["hf-export", "--load", str(ckpt), "--hf-dir", str(out)]) == 0
    from transformers import AutoModelForPreTraining, AutoTokenizer

    back = AutoModelForPreTraining.from_pretrained(out)
    assert type(back) is type(model)
    _same_state(back.state_dict(), model.state_dict())
    again = tmp_path / "again"
    assert convert(["hf-import", "--hf-dir", str(out), "--save", str(again)]) == 0
    _same_state(_weights(again), _weights(ckpt))
    from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

    ours = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer",
                                           tokenizer_model=str(out / "tokenizer.json")))
    text = "To be or not to be, the quick brown fox"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"][1:-1] == list(ours.encode(text))


@pytest.mark.parametrize("kind", BERT_KINDS)
def test_masked_lm_checkpoints_convert_both_ways(kind, tmp_path):
    """*ForMaskedLM (no pooler, no next-sentence head): imported without the binary head,
    same logits, exported as *ForMaskedLM bit for bit."""
    model = bert_dir(kind, tmp_path / "hf", BERT_VOCAB, masked_lm=True)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert convert(["hf-import", "--hf-dir", str(tmp_path / "hf"), "--save", str(ckpt)]) == 0
    b = _batch(model.config.vocab_size)
    rt = _open(ckpt)
    try:
        got = _logits(rt, b)
    finally:
        rt.mesh.destroy()
    assert got[1] is None
    _check(got, _reference(model, b), b, kind)
    assert convert(["hf-export", "--load", str(ckpt), "--hf-dir", str(out)]) == 0
    from transformers import AutoModelForMaskedLM

    back = AutoModelForMaskedLM.from_pretrained(out)
    assert type(back) is type(model)
    _same_state(back.state_dict(), model.state_dict())


def test_vocab_txt_only_becomes_a_tokenizer_json(tmp_path):
    """BERT's own vocab.txt without tokenizer.json: imported through BertTokenizerFast (exactly
    the file's tokens), exported with a tokenizer AutoTokenizer reads."""
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(BERT_VOCAB / "vocab.txt", hf / "vocab.txt")
    bert_model("megatron-bert", 30522, masked_lm=True).save_pretrained(hf)
    assert convert(["hf-import", "--hf-dir", str(hf), "--save", str(tmp_path / "ck")]) == 0
    assert convert(["hf-export", "--load", str(tmp_path / "ck"), "--hf-dir",
                    str(tmp_path / "out")]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("Hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_wordpiece_vocab_txt_round_trips(tmp_path):
    """A vocab.txt holding [BOS] and [EOS] (megapre's BertWordPiece vocabulary, as hf-export
    writes it) imports as BertWordPieceLowerCase and exports as a BertTokenizer."""
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    text = (BERT_VOCAB / "vocab.txt").read_text(encoding="utf-8")
    (vocab / "vocab.txt").write_text(text.rstrip("\n") + "\n[BOS]\n[EOS]\n", encoding="utf-8")
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(vocab / "vocab.txt", hf / "vocab.txt")
    bert_model("bert", len(text.rstrip("\n").split("\n")) + 2, masked_lm=True).save_pretrained(hf)
    assert convert(["hf-import", "--hf-dir", str(hf), "--save", str(tmp_path / "ck")]) == 0
    cfg = json.loads(next((tmp_path / "ck").glob("iter_*/config.json")).read_text())
    assert cfg["data"]["tokenizer_type"] == "BertWordPieceLowerCase"
    assert convert(["hf-export", "--load", str(tmp_path / "ck"), "--hf-dir",
                    str(tmp_path / "out")]) == 0
    from transformers import AutoTokenizer

    assert (tmp_path / "out" / "vocab.txt").read_bytes() == (vocab / "vocab.txt").read_bytes()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("Hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_tanh_gelu_bert_is_not_exported(imported, tmp_path, capsys):
    """megapre's default (tanh) GELU has no transformers BERT: refused in one line, naming the
    flag."""
    kind, _, ckpt = imported
    copy = tmp_path / "ck"
    shutil.copytree(ckpt, copy)
    path = next(copy.glob("iter_*/config.json"))
    cfg = json.loads(path.read_text())
    cfg["model"]["erf_gelu"] = False
    path.write_text(json.dumps(cfg))
    assert convert(["hf-export", "--load", str(copy), "--hf-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--erf-gelu" in err[0], err
    assert not (tmp_path / "out").exists()
