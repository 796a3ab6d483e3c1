"""tools/train_tokenizer.py end to end on real text: each kind trains on a small sample, the result
loads with build_tokenizer through the printed flags, and bad input is reported, never written."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from megapre.data.tokenizer.corpus import CorpusError, CorpusOptions, CorpusStats, iter_documents
from megapre.cli.train_tokenizer import main
from megapre.data.train_tokenizer import _sentences
from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
DATA = SHARED_DATA
SHAKESPEARE = DATA / "tinyshakespeare.txt"
WIKI = DATA / "wikitext-2" / "valid.txt"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data {path} is absent (see ../shared/data/SOURCES.md)")
    return path


@pytest.fixture(scope="module")
def wiki_jsonl(tmp_path_factory) -> Path:
    """WikiText-2 valid as gzipped JSONL documents (one per article paragraph)."""
    lines = [l for l in need(WIKI).read_text(encoding="utf-8").split("\n") if l.strip()]
    path = tmp_path_factory.mktemp("corpus") / "wiki.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": i, "text": line.strip()}) + "\n")
    return path


def printed_flags(out: str) -> list[TokenizerConfig]:
    """The "use with:" lines, parsed back into configs as a user would paste them."""
    configs = []
    for line in out.splitlines():
        if line.startswith("use with: "):
            words = line.removeprefix("use with: ").split()
            fields = {w[2:].replace("-", "_"): v for w, v in zip(words[::2], words[1::2])}
            configs.append(TokenizerConfig(**fields))
    return configs


def test_char_kind_reproduces_nanogpt_vocab(tmp_path, capsys):
    assert main(["--kind", "char", "--input", str(need(SHAKESPEARE)), "--output-dir", str(tmp_path),
                 "--output-prefix", "shakespeare_char"]) == 0
    out = capsys.readouterr().out
    (config,) = printed_flags(out)
    assert config == TokenizerConfig("CharacterTokenizer", vocab_file=str(tmp_path / "shakespeare_char.json"))
    tok = build_tokenizer(config)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert tok.vocab_size == 65 == len(set(text))
    assert tok.decode(tok.encode(text)) == text
    summary = json.loads((tmp_path / "shakespeare_char.train.json").read_text())
    blank_lines = text.split("\n")[:-1].count("")
    assert summary["corpus"]["bytes"] == len(text.encode()) - blank_lines  # blank lines only separate
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare_char.json", "shakespeare_char.train.json"]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_kind(tmp_path, capsys, wiki_jsonl, model_type):
    rc = main(["--kind", "sentencepiece", "--model-type", model_type, "--input", str(wiki_jsonl),
               "--output-dir", str(tmp_path), "--vocab-size", "500", "--sample-bytes", "100K", "--threads", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "stopped at the --max-documents/--sample-bytes cap" in out
    megatron, gpt = printed_flags(out)
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert proc.get_piece_size() == 500
    tok = build_tokenizer(gpt)
    held_out = "The lobster is a species of crustacean found in the Atlantic Ocean ."
    assert tok.encode(held_out) == proc.encode(held_out) and tok.decode(tok.encode(held_out)) == held_out
    assert (tok.vocab_size, tok.eod) == (500, proc.eos_id())
    assert build_tokenizer(megatron).vocab_size == 505  # + <CLS> <SEP> <EOD> <MASK> <PAD>
    summary = json.loads((tmp_path / "tokenizer.train.json").read_text())
    assert 100_000 <= summary["corpus"]["bytes"] < 110_000


def test_byte_bpe_kind_loads_both_ways(tmp_path, capsys):
    rc = main(["--kind", "byte-bpe", "--input", str(need(WIKI)), "--output-dir", str(tmp_path), "--output-prefix",
               "wiki", "--vocab-size", "800", "--max-documents", "800", "--special-tokens", "<|pad|>"])
    assert rc == 0
    gpt2_style, hf_json = (build_tokenizer(c) for c in printed_flags(capsys.readouterr().out))
    assert gpt2_style.config.merge_file == str(tmp_path / "wiki-merges.txt")
    assert (gpt2_style.vocab_size, gpt2_style.eod) == (800, 0)  # <|endoftext|> first
    assert (hf_json.eod, hf_json.pad) == (0, 1)
    texts = [l for l in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")[:50]] if SHAKESPEARE.exists() else []
    texts += ["unseen words: Ünïcödé 日本 👍 \n\n tabs\t"]
    for text in texts:
        ids = gpt2_style.encode(text)
        assert ids == hf_json.encode(text)
        assert gpt2_style.decode(ids) == text  # byte-level: every text round-trips


@pytest.mark.parametrize("cased", [False, True])
def test_wordpiece_kind_gives_a_bert_vocab(tmp_path, capsys, wiki_jsonl, cased):
    argv = ["--kind", "wordpiece", "--input", str(wiki_jsonl), "--output-dir", str(tmp_path),
            "--vocab-size", "1200", "--max-documents", "800"] + (["--cased"] if cased else [])
    assert main(argv) == 0
    (config,) = printed_flags(capsys.readouterr().out)
    assert config.tokenizer_type == ("BertWordPieceCase" if cased else "BertWordPieceLowerCase")
    tok = build_tokenizer(config)
    assert (tok.pad, tok.unk, tok.cls, tok.sep, tok.mask) == (0, 1, 2, 3, 4)
    assert (tok.bos, tok.eod) == (1200, 1201) and tok.vocab_size == 1202  # Megatron's [BOS]/[EOS]
    ids = tok.encode("The Lobster species")
    assert tok.unk not in ids and tok.continuation_mask().any()
    assert tok.decode(ids) == ("The Lobster species" if cased else "the lobster species")


def test_bad_records_are_counted_or_fatal(tmp_path, capsys):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(
        b'{"text": "a good document about lobsters"}\n{broken json\n{"body": "no text key"}\n'
        b'{"text": 42}\n{"text": "caf\xe9 latin-1"}\n[1, 2]\n{"text": "   "}\n{"text": "another good one"}\n'
        b'{"text": "lone \\ud800 surrogate"}\n'
    )
    out_dir = tmp_path / "out"
    assert main(["--kind", "char", "--input", str(corpus), "--output-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    for reason in ["1 malformed JSON", "1 missing key", "1 non-string value", "2 invalid UTF-8", "lone surrogate U+D800",
                   "1 not a JSON object", "1 empty document", f"{corpus}:2: malformed JSON"]:
        assert reason in out
    summary = json.loads((out_dir / "tokenizer.train.json").read_text())
    assert summary["corpus"]["documents"] == 2

    assert main(["--kind", "char", "--input", str(corpus), "--output-dir", str(tmp_path / "o2"),
                 "--on-error", "fail"]) == 1
    err = capsys.readouterr().err
    assert f"{corpus}:2: malformed JSON" in err
    assert not any(p.name != "." for p in (tmp_path / "o2").iterdir())  # nothing written, no temp left
    assert main(["--kind", "sentencepiece", "--input", str(corpus), "--output-dir", str(tmp_path / "o3"),
                 "--on-error", "fail"]) == 1
    err = capsys.readouterr().err  # the reader's message, not the trainer's wrapping of it
    assert err.startswith(f"train_tokenizer: error: {corpus}:2: malformed JSON") and "INTERNAL" not in err


def test_errors_and_existing_output_is_kept(tmp_path, capsys, wiki_jsonl):
    def run(*argv: str) -> str:
        assert main(list(argv)) == 1
        return capsys.readouterr().err

    out = str(tmp_path / "out")
    assert "no such file, and no file matches it as a glob" in run("--kind", "char", "--input", str(tmp_path / "x*.jsonl"), "--output-dir", out)
    assert "check --input and --json-keys" in run("--kind", "char", "--input", str(wiki_jsonl), "--json-keys", "body", "--output-dir", out)
    assert "lower --vocab-size" in run("--kind", "sentencepiece", "--input", str(wiki_jsonl), "--max-documents", "5",
                                       "--vocab-size", "5000", "--output-dir", out)
    assert list(Path(out).iterdir()) == []  # failed runs leave neither outputs nor temporaries
    odd = tmp_path / "corpus.dat"
    odd.write_text("text")
    assert "pass --input-format" in run("--kind", "char", "--input", str(odd), "--output-dir", out)

    assert main(["--kind", "char", "--input", str(wiki_jsonl), "--output-dir", out, "--max-documents", "10"]) == 0
    before = (Path(out) / "tokenizer.json").read_bytes()
    assert "pass --overwrite" in run("--kind", "char", "--input", str(wiki_jsonl), "--output-dir", out)
    assert (Path(out) / "tokenizer.json").read_bytes() == before
    assert main(["--kind", "char", "--input", str(wiki_jsonl), "--output-dir", out, "--overwrite"]) == 0
    assert (Path(out) / "tokenizer.json").read_bytes() != before  # more documents, more characters

    with pytest.raises(SystemExit) as exit_:
        main(["--kind", "char", "--vocab-size", "10", "--input", str(wiki_jsonl), "--output-dir", out])
    assert exit_.value.code == 2


def test_caps_spread_over_files_and_text_modes(tmp_path):
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text("".join(f"{name} doc {i}\nline two\n\n" for i in range(100)))
    stats = CorpusStats()
    docs = list(iter_documents(CorpusOptions([str(tmp_path)], max_documents=30), stats))
    assert len(docs) == 30 and stats.truncated
    assert [sum(d.startswith(n) for d in docs) for n in "abc"] == [5, 5, 5]  # 10 lines per file, half "line two"
    blocks = list(iter_documents(CorpusOptions([str(tmp_path / "a.txt")], text_mode="blank-line"), CorpusStats()))
    assert len(blocks) == 100 and blocks[0] == "a doc 0\nline two\n"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="directory holds no"):
        list(iter_documents(CorpusOptions([str(tmp_path / "empty")]), CorpusStats()))


def test_compressed_and_parquet_inputs(tmp_path):
    zstd = pytest.importorskip("zstandard")
    payload = "".join(json.dumps({"text": f"doc {i}", "meta": i}) + "\n" for i in range(20)).encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(payload))
    docs = list(iter_documents(CorpusOptions([str(tmp_path / "a.jsonl.zst")]), CorpusStats()))
    assert docs == [f"doc {i}" for i in range(20)]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y", None, "z"]}), tmp_path / "b.parquet")
    stats = CorpusStats()
    assert list(iter_documents(CorpusOptions([str(tmp_path / "b.parquet")]), stats)) == ["x y", "z"]
    assert stats.skipped["non-string value"] == 1 and "b.parquet:row 2" in stats.examples[0]


def test_long_lines_are_cut_not_dropped():
    doc = "word " * 3000 + "\n\nshort line\n"
    pieces = list(_sentences([doc], 4192))
    assert all(len(p.encode()) <= 4192 for p in pieces) and pieces[-1] == "short line"
    assert " ".join(pieces[:-1]).split() == ["word"] * 3000


@pytest.mark.slow
def test_cli_wrapper(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--kind", "char", "--input",
         str(need(SHAKESPEARE)), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--tokenizer-type CharacterTokenizer --vocab-file" in proc.stdout


def test_preprocessing_side_outputs_are_not_corpus(tmp_path):
    """A corpus directory that preprocessing also wrote into: PREFIX.errors.jsonl and PREFIX.stats.json
    are run reports, never training text, whatever --input-format says (the finder preprocessing uses)."""
    from megapre.data.preprocess.errors import ErrorLog, Skip
    from megapre.data.preprocess.stats import write_json_atomic

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "one doc\nanother doc\n"
    (corpus / "a.txt").write_text(text)
    log = ErrorLog(corpus / "a.errors.jsonl")
    log.add([Skip(str(corpus / "a.txt"), 3, "empty_document", "QZX")])
    log.close()
    write_json_atomic(corpus / "a.stats.json", {"documents": 2, "note": "QZX"})
    for inputs, input_format in [([corpus], "auto"), ([corpus], "text"), ([corpus / "a.*"], "auto")]:
        stats = CorpusStats()
        docs = list(iter_documents(CorpusOptions([str(p) for p in inputs], input_format=input_format), stats))
        assert docs == ["one doc\n", "another doc\n"] and not stats.skipped, (inputs, input_format)
        assert [Path(f).name for f in stats.files] == ["a.txt"]
    out = tmp_path / "tok"
    assert main(["--kind", "char", "--input", str(corpus), "--input-format", "text", "--output-dir", str(out)]) == 0
    tok = build_tokenizer(TokenizerConfig("CharacterTokenizer", vocab_file=str(out / "tokenizer.json")))
    assert tok.vocab_size == len(set(text))
