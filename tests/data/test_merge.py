"""tools/merge_datasets.py (megapre/cli/merge_datasets.py): inputs by prefix or directory, order, refusals."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from megapre.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megapre.cli.merge_datasets import EXIT_ERROR, EXIT_OK, main

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


def _shard(prefix: Path, first_token: int, n_docs: int, dtype=np.uint16) -> list[list[int]]:
    docs = [[first_token + 10 * d + j for j in range(d % 4 + 1)] for d in range(n_docs)]
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for doc in docs:
            b.add_document(doc, [1] * len(doc) if len(doc) > 2 else None)  # some multi-sequence docs
    return docs


def _documents(ds: IndexedDataset) -> list[list[int]]:
    di = ds.document_indices
    return [np.concatenate([ds[i] for i in range(di[d], di[d + 1])] or [np.empty(0, ds.dtype)]).tolist()
            for d in range(ds.num_documents)]


@pytest.fixture
def shards(tmp_path) -> tuple[Path, list[list[int]]]:
    """shards/s_2, s_0, s_1 written in that order; sorted order is s_0, s_1, s_2."""
    d = tmp_path / "shards"
    d.mkdir()
    docs = {k: _shard(d / f"s_{k}", 1000 * k, 5 + k) for k in (2, 0, 1)}
    return d, docs[0] + docs[1] + docs[2]


def test_merge_by_prefixes_keeps_order_and_documents(shards, tmp_path, capsys):
    d, _ = shards
    order = [d / "s_1", d / "s_2", d / "s_0"]
    assert main(["--input", *map(str, order), "--output-prefix", str(tmp_path / "all")]) == EXIT_OK
    expected = sum((_documents(IndexedDataset(p)) for p in order), [])
    merged = IndexedDataset(tmp_path / "all")
    assert _documents(merged) == expected
    out = capsys.readouterr().out
    assert "[3/3]" in out and f"merged 3 datasets into {tmp_path / 'all'}" in out
    assert f"{merged.num_tokens} tokens (uint16)" in out


def test_merge_input_dir_in_sorted_order(shards, tmp_path):
    d, expected = shards
    assert main(["--input-dir", str(d), "--output-prefix", str(tmp_path / "all")]) == EXIT_OK
    assert _documents(IndexedDataset(tmp_path / "all")) == expected
    # Megatron's spelling: --input DIR
    assert main(["--input", str(d), "--output-prefix", str(tmp_path / "all2")]) == EXIT_OK
    assert (tmp_path / "all2.bin").read_bytes() == (tmp_path / "all.bin").read_bytes()
    assert (tmp_path / "all2.idx").read_bytes() == (tmp_path / "all.idx").read_bytes()


def test_refuses_to_overwrite_inputs_and_outputs(shards, tmp_path, capsys):
    d, _ = shards
    before = (d / "s_0.bin").read_bytes(), (d / "s_0.idx").read_bytes()
    assert main(["--input", str(d / "s_0"), str(d / "s_1"), "--output-prefix", str(d / "s_0")]) == EXIT_ERROR
    assert f"{d / 's_0'}: is an input and also the --output-prefix" in capsys.readouterr().err
    # The same files reached through another path (a symlinked directory) are still the input.
    (tmp_path / "link").symlink_to(d)
    assert main(["--input", str(d / "s_1"), "--output-prefix", str(tmp_path / "link" / "s_1")]) == EXIT_ERROR
    assert "is an input" in capsys.readouterr().err
    # A previous merge written into the input directory is an input of the next --input-dir merge.
    assert main(["--input-dir", str(d), "--output-prefix", str(d / "z_all")]) == EXIT_OK
    assert main(["--input-dir", str(d), "--output-prefix", str(d / "z_all"), "--overwrite"]) == EXIT_ERROR
    assert "z_all: is an input" in capsys.readouterr().err
    assert main(["--input", str(d / "s_0"), "--output-prefix", str(d / "z_all")]) == EXIT_ERROR
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["--input", str(d / "s_0"), "--output-prefix", str(d / "z_all"), "--overwrite"]) == EXIT_OK
    assert main(["--input", str(d / "s_0"), "--output-prefix", str(tmp_path / "x.bin")]) == EXIT_ERROR
    assert "give the prefix without the extension" in capsys.readouterr().err
    assert IndexedDataset(d / "z_all").num_documents == 5
    assert ((d / "s_0.bin").read_bytes(), (d / "s_0.idx").read_bytes()) == before


def test_bad_inputs_are_named_and_nothing_is_written(shards, tmp_path, capsys):
    d, _ = shards
    out = str(tmp_path / "out")
    _shard(tmp_path / "wide", 0, 3, dtype=np.int32)
    (d / "s_1.bin").write_bytes((d / "s_1.bin").read_bytes()[:-2])
    cases = [
        (["--input", str(d / "s_0"), str(tmp_path / "nope")], f"{tmp_path / 'nope'}.idx: file not found"),
        (["--input", str(d / "s_0"), str(d / "s_1")], f"{d / 's_1'}.bin: too short for its index"),
        (["--input", str(d / "s_0"), str(tmp_path / "wide")], f"{tmp_path / 'wide'}: token dtype int32 differs"),
        (["--input-dir", str(tmp_path / "empty_dir")], "not a directory"),
    ]
    for argv, message in cases:
        assert main([*argv, "--output-prefix", out]) == EXIT_ERROR
        assert message in capsys.readouterr().err
    (tmp_path / "e").mkdir()
    assert main(["--input-dir", str(tmp_path / "e"), "--output-prefix", out]) == EXIT_ERROR
    assert "no *.idx files found" in capsys.readouterr().err
    (tmp_path / "e" / "x.idx").write_bytes(b"")
    assert main(["--input-dir", str(tmp_path / "e"), "--output-prefix", out]) == EXIT_ERROR
    assert f"{tmp_path / 'e' / 'x'}: has an .idx but no .bin" in capsys.readouterr().err
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--output-prefix", str(tmp_path / "o")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--input", "a", "--input-dir", "b", "--output-prefix", "o"])
    assert e.value.code == 2


@pytest.mark.slow
def test_cli_script(shards, tmp_path):
    d, expected = shards
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input-dir", str(d),
         "--output-prefix", str(tmp_path / "all")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "merged 3 datasets" in run.stdout
    assert _documents(IndexedDataset(tmp_path / "all")) == expected
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input", str(tmp_path / "missing"),
         "--output-prefix", str(tmp_path / "x")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert bad.returncode == 1 and "missing.idx: file not found" in bad.stderr


def test_sharded_real_text_merges_to_the_unsharded_dataset(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present (the shared data directory is not beside the repo)")
    # Paragraphs as documents, lines as sequences (the BERT sentence layout), bytes as tokens.
    paragraphs = [p for p in SHAKESPEARE.read_bytes().split(b"\n\n") if p.strip()]
    docs = [[np.frombuffer(line, np.uint8) for line in p.split(b"\n")] for p in paragraphs]

    def write(prefix: Path, part: list) -> None:
        with IndexedDatasetBuilder(prefix, np.uint8) as b:
            for seqs in part:
                b.add_document(np.concatenate(seqs), [len(s) for s in seqs])

    cut = [0, len(docs) // 3, len(docs) // 2, len(docs)]
    (tmp_path / "shards").mkdir()
    for k in range(3):
        write(tmp_path / "shards" / f"part_{k:05d}", docs[cut[k] : cut[k + 1]])
    write(tmp_path / "whole", docs)
    assert main(["--input-dir", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "merged")]) == EXIT_OK
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"whole{ext}").read_bytes()
    merged = IndexedDataset(tmp_path / "merged")
    assert merged.num_documents == len(paragraphs)
    first, last = merged.document(len(paragraphs) - 1)
    assert b"\n".join(merged[i].tobytes() for i in range(first, last)) == paragraphs[-1]
