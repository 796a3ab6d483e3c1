"""End-to-end tests of tools/preprocess_data.py (megapre.data.preprocess.main): every input format,
output equal to tokenizing the documents directly, order independent of --workers, bad input
counted with file:line, --on-error fail, shards + resume + merge, the stats file, usage errors."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from megapre.data.indexed import IndexedDataset, merge_datasets
from megapre.cli.preprocess_data import main
from megapre.data.preprocess import EXIT_FAILURE, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE
from megapre.data.preprocess.pipeline import ordered_map
from megapre.data.preprocess.sentences import split_sentences
from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = SHARED_DATA
BYTE = ["--tokenizer-type", "ByteLevelTokenizer"]
DOCS = [f"Document {i}: caf\u00e9 \u2014 {'word ' * (i % 5)}end. Second sentence {i}! Third?"
        for i in range(40)]


def byte_tok():
    return build_tokenizer(TokenizerConfig("ByteLevelTokenizer"))


def run(*argv: str) -> int:
    return main([*map(str, argv), "--progress-interval", "0"])


def read_docs(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    di = ds.document_indices
    return [np.concatenate([ds[j] for j in range(di[i], di[i + 1])]).tolist()
            for i in range(len(di) - 1)]


def expected(docs, tok=None, eod=True) -> list[list[int]]:
    tok = tok or byte_tok()
    return [tok.encode(d) + ([tok.eod] if eod else []) for d in docs]


def write_jsonl(path: Path, docs, key="text") -> Path:
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


# ----------------------------------------------------------------------------- formats

def test_every_input_format_gives_the_directly_tokenized_documents(tmp_path):
    zstd = pytest.importorskip("zstandard")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    raw = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    inputs = {"a.jsonl": raw, "b.jsonl.gz": gzip.compress(raw),
              "c.jsonl.zst": zstd.ZstdCompressor().compress(raw),
              "d.txt": ("\n".join(DOCS) + "\n").encode()}
    for name, blob in inputs.items():
        (tmp_path / name).write_bytes(blob)
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "e.parquet", row_group_size=7)
    want = expected(DOCS)
    for name in [*inputs, "e.parquet"]:
        prefix = tmp_path / "out" / name.split(".")[0]
        assert run("--input", tmp_path / name, "--output-prefix", prefix, "--append-eod",
                   "--workers", "0", "--batch-bytes", "300", *BYTE) == EXIT_OK, name
        assert read_docs(f"{prefix}_text_document") == want, name
    blocks = [d.replace(": ", ":\n") for d in DOCS]
    (tmp_path / "f.txt").write_text("\n\n\n".join(blocks) + "\n")
    assert run("--input", tmp_path / "f.txt", "--text-mode", "blank-line", "--output-prefix",
               tmp_path / "out" / "f", "--workers", "0", "--batch-bytes", "200", *BYTE) == EXIT_OK
    assert read_docs(tmp_path / "out" / "f_text_document") == expected(blocks, eod=False)


def test_gpt2_output_equals_tokenizing_the_documents(tmp_path):
    if not ((DATA / "gpt2" / "vocab.json").exists() and (DATA / "tinyshakespeare.txt").exists()):
        pytest.skip(f"needs {DATA / 'gpt2'} and {DATA / 'tinyshakespeare.txt'} (shared data beside the repo)")
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    docs = [p for p in text.split("\n\n") if p.strip()]
    write_jsonl(tmp_path / "s.jsonl", docs)
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", DATA / "gpt2" / "vocab.json",
            "--merge-file", DATA / "gpt2" / "merges.txt"]
    assert run("--input", tmp_path / "s.jsonl", "--output-prefix", tmp_path / "g", "--append-eod",
               "--workers", "0", *gpt2) == EXIT_OK
    tok = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", vocab_file=str(DATA / "gpt2" / "vocab.json"),
                                          merge_file=str(DATA / "gpt2" / "merges.txt")))
    ds = IndexedDataset(tmp_path / "g_text_document")
    assert ds.dtype == np.uint16 and ds.num_documents == len(docs)
    assert read_docs(tmp_path / "g_text_document") == expected(docs, tok)


def test_multiple_keys_and_sentence_split(tmp_path):
    rows = [{"title": f"Title {i}.", "text": d} for i, d in enumerate(DOCS)]
    (tmp_path / "k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run("--input", tmp_path / "k.jsonl", "--output-prefix", tmp_path / "k", "--json-keys",
               "text", "title", "--split-sentences", "--append-eod", "--workers", "0", *BYTE) == EXIT_OK
    tok = byte_tok()
    for key in ("text", "title"):
        ds = IndexedDataset(tmp_path / f"k_{key}_sentence")
        di = ds.document_indices
        assert ds.num_documents == len(rows)
        for i, r in enumerate(rows):
            want = [tok.encode(s) for s in split_sentences(r[key])]
            want[-1] = want[-1] + [tok.eod]
            assert [ds[j].tolist() for j in range(di[i], di[i + 1])] == want
    assert len(split_sentences(DOCS[0])) == 3


# ----------------------------------------------------------------------------- ordering & memory

@pytest.mark.slow
def test_output_is_identical_whatever_the_worker_count(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(3):
        write_jsonl(tmp_path / "in" / f"in{i}.jsonl", DOCS[i::3] * 5)
    (tmp_path / "in" / "in3.jsonl.gz").write_bytes(gzip.compress((tmp_path / "in" / "in0.jsonl").read_bytes()))
    outs = []
    for w in (0, 1, 2, 3):
        prefix = tmp_path / f"w{w}"
        assert run("--input", tmp_path / "in", "--output-prefix", prefix, "--workers", w,
                   "--batch-bytes", "500", "--append-eod", *BYTE) == EXIT_OK
        outs.append([Path(f"{prefix}_text_document{s}").read_bytes() for s in (".bin", ".idx")])
    assert all(o == outs[0] for o in outs[1:])
    assert read_docs(tmp_path / "w0_text_document")[:2] == expected([DOCS[0], DOCS[3]])


@pytest.mark.slow
def test_reader_runs_at_most_max_inflight_batches_ahead(tmp_path):
    from megapre.data.preprocess.encode import EncodeConfig
    from megapre.data.preprocess.readers import RawBatch

    pulled = []

    def batches():
        for i in range(30):
            pulled.append(i)
            yield RawBatch(0, 1, "text-line", f"doc {i}\n".encode(), 6)

    cfg = EncodeConfig(("text",), False, False, False, "uint16")
    for k, enc in enumerate(ordered_map(batches(), 2, 4, (byte_tok(), cfg))):
        assert len(pulled) <= k + 4
        assert bytes(enc.tokens[0].tolist()).decode() == f"doc {k}"


# ----------------------------------------------------------------------------- bad input

def test_bad_records_are_skipped_counted_and_located(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = tmp_path / "a.jsonl"
    good.write_bytes(b'{"text": "fine one"}\n'
                     b"{broken\n"
                     b"\n"
                     b'{"body": "x"}\n'
                     b'{"text": ["list"]}\n'
                     b'{"text": "bad \xff byte"}\n'
                     b'{"text": "   "}\n'
                     b'"just a string"\n'
                     b'{"text": "fine two"}\n')
    (tmp_path / "b.txt").write_bytes(b"line ok\n\xc3(\n")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "c.parquet")
    prefix = tmp_path / "out" / "p"
    assert run("--input", tmp_path, "--output-prefix", prefix, "--workers", "0", *BYTE) == EXIT_SKIPPED
    assert read_docs(f"{prefix}_text_document") == expected(["fine one", "fine two", "line ok"], eod=False)
    rows = [json.loads(l) for l in Path(f"{prefix}.errors.jsonl").read_text().splitlines()]
    got = [(Path(r["file"]).name, r["line"], r["reason"]) for r in rows]
    assert got == [("a.jsonl", 2, "malformed_json"), ("a.jsonl", 3, "blank_line"),
                   ("a.jsonl", 4, "missing_key"), ("a.jsonl", 5, "non_string_value"),
                   ("a.jsonl", 6, "invalid_utf8"), ("a.jsonl", 7, "empty_document"),
                   ("a.jsonl", 8, "not_an_object"), ("b.txt", 2, "invalid_utf8"),
                   ("c.parquet", 0, "missing_key")]
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    assert stats["skipped"] == {"malformed_json": 1, "not_an_object": 1, "missing_key": 3,
                                "non_string_value": 1, "invalid_utf8": 2, "empty_document": 1,
                                "blank_line": 1}
    assert stats["skipped_total"] == 10 and stats["exit_code"] == EXIT_SKIPPED
    err = capsys.readouterr().err
    assert "skipped 10 record(s)" in err and f"{tmp_path / 'a.jsonl'}:2: malformed_json" in err


def test_on_error_fail_stops_at_the_first_bad_record(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:5])
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"text": 3}\n{broken\n')
    prefix = tmp_path / "p"
    assert run("--input", tmp_path / "a.jsonl", "--output-prefix", prefix, "--on-error", "fail",
               "--workers", "0", *BYTE) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a.jsonl'}:6: non_string_value" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]     # nothing published


def test_truncated_file_skips_its_rest_and_the_run_goes_on(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    blob = gzip.compress("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5000)).encode())
    (tmp_path / "b.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    write_jsonl(tmp_path / "c.jsonl", DOCS[:3])
    args = ["--input", tmp_path, "--output-prefix", tmp_path / "out" / "p", "--workers", "0",
            "--batch-bytes", "2048", *BYTE]
    assert run(*args) == EXIT_SKIPPED
    docs = read_docs(tmp_path / "out" / "p_text_document")
    kept = len(docs) - len(DOCS) - 3
    assert 0 < kept < 5000 and docs[-3:] == expected(DOCS[:3], eod=False)
    (row,) = [json.loads(l) for l in (tmp_path / "out" / "p.errors.jsonl").read_text().splitlines()]
    assert row["reason"] == "unreadable_file" and row["line"] == kept + 1
    assert run(*args, "--on-error", "fail", "--overwrite") == EXIT_FAILURE
    assert f"b.jsonl.gz:{kept + 1}: unreadable_file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shards, resume, stats

def test_shards_resume_and_merge(tmp_path, capsys, monkeypatch):
    files = [write_jsonl(tmp_path / f"in{i}.jsonl", DOCS[i * 8:(i + 1) * 8 + i]) for i in range(4)]
    args = ["--input", tmp_path / "in*.jsonl", "--output-prefix", tmp_path / "out" / "p",
            "--append-eod", "--workers", "0", *BYTE]
    assert run(*args, "--shard-index", "0", "--num-shards", "3") == EXIT_OK
    assert "1/3 shards finished" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")                      # torchrun's variables as defaults
    for rank in ("1", "2"):
        monkeypatch.setenv("RANK", rank)
        assert run(*args) == EXIT_OK
    err = capsys.readouterr().err
    assert "all 3 shards finished" in err and "merge_datasets.py" in err
    stats0 = tmp_path / "out" / "p_shard00000-of-00003.stats.json"
    before = stats0.stat().st_mtime_ns
    monkeypatch.setenv("RANK", "0")
    assert run(*args) == EXIT_OK                               # finished shard: skipped
    assert stats0.stat().st_mtime_ns == before
    assert "already finished" in capsys.readouterr().err
    shards = [tmp_path / "out" / f"p_shard{i:05d}-of-00003_text_document" for i in range(3)]
    parts = [json.loads(Path(str(s).replace("_text_document", ".stats.json")).read_text())
             for s in shards]
    assert sorted(Path(i["path"]).name for p in parts for i in p["inputs"]) == [f.name for f in files]
    merge_datasets(shards, tmp_path / "merged")
    merged = read_docs(tmp_path / "merged")
    per_file = {f.name: expected([json.loads(l)["text"] for l in f.read_text().splitlines()]) for f in files}
    assert merged == [d for p in parts for i in p["inputs"] for d in per_file[Path(i["path"]).name]]


def test_rerun_with_other_settings_needs_overwrite(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    args = ["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "p", "--workers", "0", *BYTE]
    assert run(*args) == EXIT_OK
    assert run(*args, "--append-eod") == EXIT_USAGE
    assert "different append_eod" in capsys.readouterr().err
    assert run(*args, "--append-eod", "--overwrite") == EXIT_OK
    assert read_docs(tmp_path / "p_text_document") == expected(DOCS)


def test_stats_file_contents(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS + [""])
    assert run("--input", path, "--output-prefix", tmp_path / "p", "--append-eod", "--workers", "0",
               *BYTE) == EXIT_SKIPPED
    s = json.loads((tmp_path / "p.stats.json").read_text())
    n_tokens = sum(map(len, expected(DOCS)))
    assert s["complete"] and s["documents"] == len(DOCS)
    assert s["tokens"] == {"text": n_tokens} and s["sequences"] == {"text": len(DOCS)}
    assert s["bytes"] == path.stat().st_size and s["skipped"] == {"empty_document": 1}
    assert s["inputs"] == [{"path": str(path), "format": "jsonl", "compression": "none",
                            "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
                            "head_tail_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                            "bytes_read": path.stat().st_size,
                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert s["tokenizer"] == byte_tok().describe()
    assert s["args"]["append_eod"] is True and s["args"]["tokenizer"]["tokenizer_type"] == "ByteLevelTokenizer"
    assert s["elapsed_s"] > 0 and s["outputs"]["text"]["dtype"] == "uint16"
    assert s["errors_file"] == str(tmp_path / "p.errors.jsonl")


# ----------------------------------------------------------------------------- usage errors

@pytest.mark.parametrize("extra,message", [
    (["--input", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
    (["--workers", "-1"], "--workers"),
    (["--shard-index", "4", "--num-shards", "2"], "outside 0..1"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "/nonexistent/v.json"], "vocab"),
    (["--json-keys", "a", "b", "--input", "TXT"], "--json-keys"),
])
def test_usage_errors_exit_2_and_name_the_problem(tmp_path, capsys, extra, message):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
    (tmp_path / "t.txt").write_text("x\n")
    extra = [str(tmp_path / "t.txt") if e == "TXT" else e for e in extra]
    args = ["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "p", *BYTE, *extra]
    assert run(*args) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.stats.json").exists()


@pytest.mark.slow
def test_command_line_tool_with_workers(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS * 20)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
                           str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "p"),
                           "--workers", "2", "--append-eod", "--batch-bytes", "4096", *BYTE],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "documents" in proc.stderr and "tokens/s" in proc.stderr
    assert read_docs(tmp_path / "p_text_document") == expected(DOCS * 20)
    help_text = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "exit codes" in help_text and "--on-error" in help_text


class _Fragile:
    """ByteLevel tokenizer that raises on any text containing BOOM (a tokenizer bug stand-in)."""

    def __init__(self):
        self.inner = byte_tok()
        self.eod, self.name, self.vocab_size = self.inner.eod, "fragile", self.inner.vocab_size

    def encode_batch(self, texts):
        if any("BOOM" in t for t in texts):
            raise RuntimeError("cannot encode BOOM")
        return self.inner.encode_batch(texts)


@pytest.mark.parametrize("split", [False, True])
def test_a_text_the_tokenizer_rejects_is_skipped_not_fatal(split):
    from megapre.data.preprocess.encode import EncodeConfig, Encoder
    from megapre.data.preprocess.readers import RawBatch

    payload = "".join(json.dumps({"text": t}) + "\n" for t in ["Ok one. Two.", "A. BOOM here.", "Fine."])
    enc = Encoder(_Fragile(), EncodeConfig(("text",), True, split, False, "uint16"))(
        RawBatch(0, 10, "jsonl", payload.encode(), len(payload)))
    assert enc.num_docs == 2 and enc.skips == [(11, "tokenizer_error", "RuntimeError: cannot encode BOOM")]
    tok = byte_tok()
    assert enc.tokens[0].tolist() == (tok.encode("Ok one.") + tok.encode("Two.") if split else
                                      tok.encode("Ok one. Two.")) + [tok.eod] + tok.encode("Fine.") + [tok.eod]


def test_bert_wordpiece_sentences_with_kept_newlines(tmp_path):
    vocab = DATA / "bert" / "vocab.txt"
    if not (vocab.exists() and (DATA / "tinyshakespeare.txt").exists()):
        pytest.skip(f"needs {vocab} and {DATA / 'tinyshakespeare.txt'} (shared data beside the repo)")
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    docs = [p for p in text.split("\n\n") if p.strip()]
    write_jsonl(tmp_path / "b.jsonl", docs)
    assert run("--input", tmp_path / "b.jsonl", "--output-prefix", tmp_path / "bert", "--split-sentences",
               "--keep-newlines", "--workers", "0", "--tokenizer-type", "BertWordPieceLowerCase",
               "--vocab-file", vocab) == EXIT_OK
    tok = build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file=str(vocab)))
    ds = IndexedDataset(tmp_path / "bert_text_sentence")
    di = ds.document_indices
    assert ds.num_documents == len(docs) and len(ds) > len(docs)      # several sentences per doc
    for i, d in enumerate(docs):
        want = [ids for ids in (tok.encode(s) for s in split_sentences(d, keep_newlines=True)) if ids]
        assert [ds[j].tolist() for j in range(di[i], di[i + 1])] == want


def test_pretokenized_ids_with_null_tokenizer(tmp_path):
    (tmp_path / "ids.jsonl").write_text('{"text": "1 2 3"}\n{"text": "4 x 5"}\n{"text": "70000"}\n')
    assert run("--input", tmp_path / "ids.jsonl", "--output-prefix", tmp_path / "n", "--append-eod",
               "--workers", "0", "--tokenizer-type", "NullTokenizer", "--vocab-size", "70001") == EXIT_SKIPPED
    ds = IndexedDataset(tmp_path / "n_text_document")
    eod = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=70001)).eod
    assert ds.dtype == np.int32 and [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3, eod], [70000, eod]]
    (row,) = [json.loads(l) for l in (tmp_path / "n.errors.jsonl").read_text().splitlines()]
    assert (row["line"], row["reason"]) == (2, "tokenizer_error") and "'x'" in row["detail"]
