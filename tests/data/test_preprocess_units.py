"""Unit tests of the preprocess pieces that need no tokenizer or dataset writer: input discovery,
record-aligned streaming with line numbers, per-record validation, the sentence splitter, shard
assignment, and the errors file."""
from __future__ import annotations

import gzip
import io
import json
import random

import pytest

from megapre.data.preprocess import readers as rd
from megapre.data.preprocess import records as rc
from megapre.data.preprocess import shards as sh
from megapre.data.preprocess.errors import ErrorLog, InputError, Skip
from megapre.data.preprocess.sentences import split_sentences


# ----------------------------------------------------------------------------- discovery

def test_expand_inputs_dir_glob_file_dedupe(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ["b/2.jsonl.gz", "a.jsonl", "b/1.txt", "c.parquet", "skip.csv", ".hidden.jsonl",
                 "p.stats.json", "p.errors.jsonl"]:
        (tmp_path / name).write_bytes(b"")
    files = rd.expand_inputs([str(tmp_path)])
    names = [f.path[len(str(tmp_path)) + 1:] for f in files]
    assert names == ["a.jsonl", "b/1.txt", "b/2.jsonl.gz", "c.parquet"]
    assert [(f.format, f.compression) for f in files] == [
        ("jsonl", "none"), ("text", "none"), ("jsonl", "gzip"), ("parquet", "none")]
    again = rd.expand_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "*.jsonl"), str(tmp_path)])
    assert [f.path for f in again][0].endswith("a.jsonl") and len(again) == 4


@pytest.mark.parametrize("pattern,message", [
    ("nope.jsonl", "no such file"), ("*.nothing", "matches no files"), ("weird.csv", "cannot tell the format")])
def test_expand_inputs_errors_name_the_input(tmp_path, pattern, message):
    (tmp_path / "weird.csv").write_text("x")
    with pytest.raises(ValueError, match=message):
        rd.expand_inputs([str(tmp_path / pattern)])
    assert rd.expand_inputs([str(tmp_path / "weird.csv")], "jsonl")[0].format == "jsonl"


# ----------------------------------------------------------------------------- streaming

def _reassemble(data: bytes, batch_bytes: int, kind: str) -> list[tuple[str, int]]:
    boundary = rd._block_boundary if kind == "text-block" else rd._line_boundary
    chunks = list(rd.iter_raw_chunks(io.BytesIO(data), batch_bytes, boundary))
    assert b"".join(c for _, c in chunks) == data
    out = []
    for first, chunk in chunks:
        recs = rc.parse_batch(rd.RawBatch(0, first, kind, chunk, len(chunk)), ["text"])
        out += [(t[0], line) for t, line in zip(recs.texts, recs.lines)]
    return out


@pytest.mark.parametrize("batch_bytes", [1, 7, 64, 1 << 20])
def test_chunks_keep_records_whole_and_lines_exact(batch_bytes):
    rng = random.Random(0)
    docs = ["x" + "".join(rng.choice("ab é\u2028") for _ in range(rng.randrange(1, 40))) for _ in range(60)]
    jsonl = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    assert _reassemble(jsonl, batch_bytes, "jsonl") == [(d, i + 1) for i, d in enumerate(docs)]
    blocks = [["x" * rng.randrange(1, 9) for _ in range(rng.randrange(1, 4))] for _ in range(30)]
    text, expect, line = "", [], 1
    for b in blocks:
        gap = rng.choice(["\n", "\n  \n", "\n\n\n"])
        expect.append(("\n".join(b), line))
        text += "\n".join(b) + "\n" + gap
        line += len(b) + gap.count("\n")
    assert _reassemble(text.encode(), batch_bytes, "text-block") == expect


def test_file_reader_gzip_zstd_checksum_and_line_numbers(tmp_path):
    zstd = pytest.importorskip("zstandard")
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(500)]
    raw = ("\n".join(lines) + "\n").encode()
    paths = {"p.jsonl": raw, "g.jsonl.gz": gzip.compress(raw),
             "z.jsonl.zst": zstd.ZstdCompressor().compress(raw)}
    for name, blob in paths.items():
        (tmp_path / name).write_bytes(blob)
    for f in rd.expand_inputs([str(tmp_path)]):
        reader = rd.FileReader(f, 0, 300, "line", ["text"])
        got = []
        for batch in reader:
            recs = rc.parse_batch(batch, ["text"])
            got += [(t[0], line) for t, line in zip(recs.texts, recs.lines)]
        assert got == [(f"doc {i}", i + 1) for i in range(500)], f.path
        assert reader.sha256 == rd.sha256_file(f.path) and reader.nbytes == len(raw)


def test_truncated_gzip_keeps_what_was_read_and_reports_the_rest(tmp_path):
    blob = gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(20000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    reader = rd.FileReader(rd.expand_inputs([str(path)])[0], 0, 4096, "line", ["text"])
    *batches, last = list(reader)
    lines = sum(b.payload.count(b"\n") for b in batches)
    assert last.kind == "skip" and last.payload.reason == "unreadable_file"
    assert last.payload.line == lines + 1 and f"from line {lines + 1}" in last.payload.detail
    assert 0 < lines < 20000 and reader.sha256 == rd.sha256_file(str(path))


# ----------------------------------------------------------------------------- validation

def test_jsonl_every_bad_kind_is_reported_with_its_line():
    payload = (b'{"text": "ok", "m": "x"}\n'
               b"\n"
               b'{"text": 5, "m": "x"}\n'
               b'{"m": "x"}\n'
               b"{not json\n"
               b"[1, 2]\n"
               b'{"text": "\xff\xfe", "m": "x"}\n'
               b'{"text": "  \\n ", "m": "x"}\n'
               b'{"text": "\\ud800", "m": "x"}\n'
               b'{"text": "fine", "m": null}\n'
               b'{"text": "last", "m": "y"}')
    recs = rc.parse_batch(rd.RawBatch(0, 101, "jsonl", payload, len(payload)), ["text", "m"])
    assert recs.texts == [("ok", "x"), ("last", "y")] and recs.lines == [101, 111]
    assert [(line, reason) for line, reason, _ in recs.skips] == [
        (102, "blank_line"), (103, "non_string_value"), (104, "missing_key"),
        (105, "malformed_json"), (106, "not_an_object"), (107, "invalid_utf8"),
        (108, "empty_document"), (109, "malformed_json"), (110, "non_string_value")]
    assert "'text'" in recs.skips[2][2] and "0xff" in recs.skips[5][2]


def test_byte_order_mark_opening_a_file_is_dropped():
    payload = b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n'
    assert rc.parse_batch(rd.RawBatch(0, 1, "jsonl", payload, 0), ["text"]).texts == [("a",), ("b",)]
    text = rc.parse_batch(rd.RawBatch(0, 1, "text-line", b"\xef\xbb\xbfone\n", 0), ["text"])
    assert text.texts == [("one",)]


def test_text_modes_report_bad_utf8_and_separate_on_blank_lines():
    payload = b"one\r\n\ntw\xc3o\nthree\n  \n"
    lines = rc.parse_batch(rd.RawBatch(0, 1, "text-line", payload, 0), ["text"])
    assert lines.texts == [("one",), ("three",)] and lines.lines == [1, 4]
    # blank lines separate documents in line mode too: not bad records (issue 10)
    assert [(l, r) for l, r, _ in lines.skips] == [(3, "invalid_utf8")]
    blocks = rc.parse_batch(rd.RawBatch(0, 1, "text-block", b"a\nb\n\nc\n\xff\n\n\nd", 0), ["text"])
    assert blocks.texts == [("a\nb",), ("d",)] and blocks.lines == [1, 8]
    assert [(l, r) for l, r, _ in blocks.skips] == [(4, "invalid_utf8")]


def test_parquet_rows_nulls_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None, "", "d"] * 50, "n": list(range(200))}), path,
                   row_group_size=64)
    f = rd.expand_inputs([str(path)])[0]
    texts, skips = [], []
    for batch in rd.FileReader(f, 0, 100, "line", ["text"]):
        recs = rc.parse_batch(batch, ["text"])
        texts += list(zip(recs.texts, recs.lines))
        skips += recs.skips
    assert texts[:2] == [(("a",), 1), (("d",), 4)] and len(texts) == 100
    assert skips[:2] == [(2, "non_string_value", "column 'text' holds null, not a string"),
                         (3, "empty_document", "column 'text' is empty or whitespace only")]
    (only,) = list(rd.FileReader(f, 0, 100, "line", ["body"]))
    assert only.kind == "skip" and only.payload.reason == "missing_key" and only.payload.count == 200
    assert "'body'" in only.payload.detail and "text, n" in only.payload.detail


# ----------------------------------------------------------------------------- sentences

@pytest.mark.parametrize("text,expect", [
    ("Mr. Smith paid $3.50 for it! Did he? Yes.", ["Mr. Smith paid $3.50 for it!", "Did he?", "Yes."]),
    ('"Stop!" she said. "Now." Then J. R. R. Tolkien left.',
     ['"Stop!" she said.', '"Now."', "Then J. R. R. Tolkien left."]),
    ("It was 5 p.m. when we left, i.e. late. The U.S. Army came... Then rain.",
     ["It was 5 p.m. when we left, i.e. late.", "The U.S. Army came...", "Then rain."]),
    ("See Fig. 3 and No. 5. (An aside.) Version 2.0 is out.",
     ["See Fig. 3 and No. 5.", "(An aside.)", "Version 2.0 is out."]),
    ("wrapped\nline. Next one\n\nparagraph without stop\nNew para? ok", [
        "wrapped\nline.", "Next one", "paragraph without stop\nNew para? ok"]),
    ("   ", []),
])
def test_sentence_splitter(text, expect):
    assert split_sentences(text) == expect


def test_keep_newlines_restores_line_breaks():
    text = "First one.\nSecond one. Third.\n\nFourth.\n"
    kept = split_sentences(text, keep_newlines=True)
    assert kept == ["First one.\n", "Second one.", "Third.\n\n", "Fourth.\n"]
    assert "".join(kept).replace(" ", "") == text.replace(" ", "")


# ----------------------------------------------------------------------------- shards

def _files(sizes):
    return [rd.InputFile(f"f{i}.jsonl", "jsonl", "none", s) for i, s in enumerate(sizes)]


def test_shards_partition_files_deterministically_and_balanced():
    files = _files([random.Random(1).randrange(1, 10_000) for _ in range(37)])
    parts = [sh.assign_files(files, sh.ShardSpec(i, 4)) for i in range(4)]
    assert sorted(f.path for p in parts for f in p) == sorted(f.path for f in files)
    assert all(p == sorted(p, key=files.index) for p in parts)           # input order kept
    loads = [sum(f.size for f in p) for p in parts]
    assert max(loads) - min(loads) <= max(f.size for f in files)
    assert parts == [sh.assign_files(files, sh.ShardSpec(i, 4)) for i in range(4)]
    assert sh.assign_files(_files([5]), sh.ShardSpec(1, 2)) == []        # more shards than files


def test_resolve_shard_flags_env_and_errors():
    assert sh.resolve_shard(None, None, {}) == sh.ShardSpec(0, 1)
    assert sh.resolve_shard(None, None, {"RANK": "2", "WORLD_SIZE": "3"}) == sh.ShardSpec(2, 3)
    assert sh.resolve_shard(1, 2, {"RANK": "0", "WORLD_SIZE": "8"}) == sh.ShardSpec(1, 2)
    for index, count, msg in [(2, 2, "outside 0..1"), (1, None, "needs --num-shards"),
                              (0, 0, ">= 1")]:
        with pytest.raises(ValueError, match=msg):
            sh.resolve_shard(index, count, {})
    assert sh.run_prefix("out/p", sh.ShardSpec(3, 12)) == "out/p_shard00003-of-00012"
    assert sh.dataset_prefix("p", "text", True) == "p_text_sentence"


# ----------------------------------------------------------------------------- errors file

def test_error_log_publishes_atomically_and_fail_fast(tmp_path):
    log = ErrorLog(tmp_path / "p.errors.jsonl")
    log.add([Skip("a.jsonl", 3, "malformed_json", "x"), Skip("b.parquet", 0, "missing_key", "y", 40)])
    assert not (tmp_path / "p.errors.jsonl").exists()
    log.close()
    rows = [json.loads(l) for l in (tmp_path / "p.errors.jsonl").read_text().splitlines()]
    assert rows[0] == {"file": "a.jsonl", "line": 3, "reason": "malformed_json", "detail": "x", "count": 1}
    assert log.by_reason() == {"malformed_json": 1, "missing_key": 40} and log.total == 41
    ErrorLog(tmp_path / "p.errors.jsonl").close()                      # a clean rerun removes it
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=r"^a.jsonl:7: invalid_utf8: bad"):
        ErrorLog(tmp_path / "q", fail_fast=True).add([Skip("a.jsonl", 7, "invalid_utf8", "bad")])


def test_progress_line_rates_and_eta():
    from megapre.data.preprocess.stats import Counters, Progress

    counters = Counters(documents=10, bytes=500)
    counters.add("text", 1000, 10)
    out = io.StringIO()
    progress = Progress(counters, interval=1e-9, stream=out, total_bytes=2000)
    progress.update(skipped=2)
    line = out.getvalue()
    assert line.endswith("\n") and "10 docs" in line and "1,000 tokens" in line and "MB/s" in line
    assert "2 skipped" in line and "[25%, ETA" in line
    Progress(counters, interval=0, stream=out).update()
    assert out.getvalue() == line                                      # interval 0: silent
