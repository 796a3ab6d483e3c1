"""SentencePiece tokenizers across the Hugging Face door: a directory with only tokenizer.model
imports as GPTSentencePieceTokenizer, and both Megatron flavours export so that
`AutoTokenizer.from_pretrained(OUT)` gives megapre's ids, special strings included."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
spm = pytest.importorskip("sentencepiece")

from hf_cases import TEXT, hf_model  # noqa: E402
from megapre.cli.convert import main as convert  # noqa: E402
from megapre.convert.hf_tokenizer import export_tokenizer  # noqa: E402
from megapre.data.tokenizers import TokenizerConfig, build_tokenizer  # noqa: E402

# whitespace runs, NFKC-folded characters, an unknown character, literal special strings
SAMPLES = ["the quick brown fox jumps over the lazy dog.",
           "  to be   or not\n\nto be,  that is ① the ﬁne question Ａ",
           "a stitch <s> in time </s> saves <unk> nine",
           "all that <CLS> glitters <SEP> is <MASK> not gold <EOD> <PAD>", ""]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A small BPE SentencePiece model with sentencepiece's default normalizer (NFKC, collapsed
    whitespace): not Llama's settings, which is what a Llama-style export would assume."""
    path = tmp_path_factory.mktemp("spm") / "sp.model"
    lines = [s.strip() + "." for s in TEXT.split(".") if s.strip()][:40]
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f,
                                       vocab_size=120, model_type="bpe", minloglevel=2,
                                       num_threads=1)
    return path


def _hf_tokenizer(files: dict[str, bytes], out: Path):
    from transformers import AutoTokenizer

    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("kind", ["GPTSentencePieceTokenizer", "SentencePieceTokenizer"])
def test_sentencepiece_export_gives_megapres_ids(sp_model, kind, tmp_path):
    ours = build_tokenizer(TokenizerConfig(kind, tokenizer_model=str(sp_model)))
    files, copies, note = export_tokenizer({"tokenizer_type": kind,
                                            "tokenizer_model": str(sp_model)}, ours, 64)
    assert note is None and copies == []
    hf = _hf_tokenizer(files, tmp_path / "out")
    assert len(hf) == ours.vocab_size
    for text in SAMPLES:
        assert hf(text)["input_ids"] == ours.encode(text), text
    if kind == "SentencePieceTokenizer":  # the appended specials keep their roles
        assert (hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.pad_token_id) == \
            (ours.cls, ours.sep, ours.mask, ours.pad)


def test_tokenizer_model_directory_round_trips(sp_model, tmp_path):
    """A Llama directory whose tokenizer is only tokenizer.model: imported, exported, same ids."""
    n = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    hf = tmp_path / "hf"
    hf_model("llama", n).save_pretrained(hf)
    (hf / "tokenizer.model").write_bytes(sp_model.read_bytes())
    assert convert(["hf-import", "--hf-dir", str(hf), "--save", str(tmp_path / "ck")]) == 0
    cfg = json.loads(next((tmp_path / "ck").glob("iter_*/config.json")).read_text())
    assert cfg["data"]["tokenizer_type"] == "GPTSentencePieceTokenizer"
    assert Path(cfg["data"]["tokenizer_model"]).read_bytes() == sp_model.read_bytes()
    out = tmp_path / "out"
    assert convert(["hf-export", "--load", str(tmp_path / "ck"), "--hf-dir", str(out)]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ours = build_tokenizer(TokenizerConfig("GPTSentencePieceTokenizer",
                                           tokenizer_model=str(sp_model)))
    for text in SAMPLES:
        assert tok(text)["input_ids"] == ours.encode(text), text
