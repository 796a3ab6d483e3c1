"""Blending: --data-path/--split parsing, the greedy blend (C++ vs Python vs megatron-core; exact to
one sample at every prefix), blended train/valid/test datasets, caching, tools/build_index.py."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from megapre.data import gpt_helpers
from megapre.data.blend import BlendConfig, BlendedDataset, build_gpt_datasets, parse_blend, samples_per_dataset
from megapre.cli.build_index import main as build_index_main
from megapre.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from megapre.data.index_cache import CacheConfig
from megapre.data.split import parse_split, split_ranges
from test_gpt_dataset import megatron_helpers, open_indexed, random_docs, write_indexed

REPO = Path(__file__).resolve().parents[2]


# --- parsing ------------------------------------------------------------------------------------

def test_parse_blend():
    assert parse_blend(["0.3", "A", "0.7", "B"]) == (["A", "B"], [0.3, 0.7])
    assert parse_blend(["30", "A", "70", "B"]) == (["A", "B"], [30.0, 70.0])
    assert parse_blend(["A", "B"]) == (["A", "B"], None)
    for bad, msg in ((["0.3", "A", "B"], "either prefixes only"), (["0.3", "A", "0.7"], "either prefixes"),
                     (["-1", "A"], ">= 0"), (["0", "A", "0", "B"], "sum to 0"), ([], "no dataset")):
        with pytest.raises(ValueError, match=msg):
            parse_blend(bad)


def test_parse_split_and_ranges_follow_megatron():
    assert parse_split("969,30,1") == pytest.approx((0.969, 0.030, 0.001))
    assert parse_split("99,1") == pytest.approx((0.99, 0.01, 0.0))
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)
    # megatron-core: [round(lo * n), round(hi * n)) over cumulative fractions; None for a 0 share
    assert split_ranges(parse_split("969,30,1"), 10_000) == [(0, 9690), (9690, 9990), (9990, 10000)]
    assert split_ranges(parse_split("98,2,0"), 7) == [(0, 7), (7, 7), None]


# --- the blend ----------------------------------------------------------------------------------

def test_blend_is_exact_at_every_prefix():
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 5, 8, 40):
        w = rng.random(k) ** 3 + 1e-3
        w /= w.sum()
        di, dsi = gpt_helpers.build_blending_indices(w, 20_000)
        counts = np.zeros(k)
        onehot = np.eye(k)[di]
        prefix = np.cumsum(onehot, axis=0)  # [n, k]: counts after each prefix
        deviation = np.abs(prefix - np.arange(1, 20_001)[:, None] * w[None, :]).max()
        assert deviation < 1.0, (k, deviation)
        for i in range(k):  # each dataset's samples are used in order 0, 1, 2, ...
            counts[i] = (di == i).sum()
            np.testing.assert_array_equal(dsi[di == i], np.arange(counts[i]))


@pytest.mark.parametrize("megatron_compatible", [False, True])
def test_blend_compiled_matches_reference(megatron_compatible):
    w = np.array([0.5, 0.2, 0.2, 0.1])
    ours = gpt_helpers.build_blending_indices(w, 3000, megatron_compatible)
    ref = gpt_helpers.blending_indices_reference(w, 3000, megatron_compatible)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    assert ours[0].dtype == np.int16 and ours[1].dtype == np.int64


def test_megatron_compatible_blend_equals_megatron():
    helpers = megatron_helpers()
    w = np.array([0.13, 0.52, 0.35])
    di = np.zeros(5000, dtype=np.int16)
    dsi = np.zeros(5000, dtype=np.int64)
    helpers.build_blending_indices(di, dsi, w, 3, 5000, False)
    ours = gpt_helpers.build_blending_indices(w, 5000, megatron_compatible=True)
    np.testing.assert_array_equal(ours[0], di)
    np.testing.assert_array_equal(ours[1], dsi)


def test_blend_rejects_bad_weights():
    with pytest.raises(ValueError, match="sum to 1"):
        gpt_helpers.build_blending_indices(np.array([0.5, 0.6]), 10)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        gpt_helpers.build_blending_indices(np.array([1.5, -0.5]), 10)


# --- blended datasets of a run ------------------------------------------------------------------

@pytest.fixture
def corpora(tmp_path):
    rng = np.random.default_rng(1)
    return [write_indexed(tmp_path / f"c{i}_text_document", random_docs(rng, n)) for i, n in enumerate((150, 90, 200))]


def gpt_config(tmp_path, **kw):
    return GPTDatasetConfig(seq_length=8, cache=CacheConfig(cache_dir=str(tmp_path / "cache")), **kw)


def test_blended_train_valid_test(tmp_path, corpora):
    a, b, c = corpora
    blend = BlendConfig(data_path=["0.5", a, "0.2", b, "0.3", c], split="90,8,2")
    sets = build_gpt_datasets(blend, gpt_config(tmp_path), (3000, 200, 0), open_dataset=open_indexed)
    train, valid = sets["train"], sets["valid"]
    assert sets["test"] is None  # no samples requested
    assert isinstance(train, BlendedDataset) and len(train) == 3000 and len(valid) == 200
    w = np.array([0.5, 0.2, 0.3])
    prefix = np.cumsum(np.eye(3)[np.asarray(train.dataset_index)], axis=0)
    assert np.abs(prefix - np.arange(1, 3001)[:, None] * w).max() < 1.0
    assert [len(d) >= n for d, n in zip(train.datasets, samples_per_dataset(3000, w))] == [True] * 3
    assert samples_per_dataset(3000, w) == [1508, 603, 905]  # ceil(ceil(n * w) * 1.005)
    for i in (0, 1, 2, 1234, 2999):
        d, s = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        np.testing.assert_array_equal(train[i]["tokens"], train.datasets[d][s]["tokens"])
    # the splits are disjoint document ranges of each corpus (round(0.9 * 150) = 135, ...)
    assert train.datasets[0].document_range == (0, 135) and valid.datasets[0].document_range == (135, 147)
    assert train.cache_status == "built"
    clone = pickle.loads(pickle.dumps(train))  # DataLoader workers: indices re-mapped, not copied
    assert isinstance(clone.dataset_index, np.memmap) and isinstance(clone.datasets[0].sample_index, np.memmap)
    np.testing.assert_array_equal(clone[1234]["labels"], train[1234]["labels"])
    again = build_gpt_datasets(blend, gpt_config(tmp_path), (3000, 200, 0), open_dataset=open_indexed)
    assert again["train"].cache_status == "loaded" and all(d.cache_status == "loaded" for d in again["train"].datasets)
    np.testing.assert_array_equal(again["train"].dataset_index, train.dataset_index)


def test_bare_prefixes_are_weighted_by_tokens(tmp_path, corpora):
    blend = BlendConfig(data_path=corpora, split="1,0,0")
    train = build_gpt_datasets(blend, gpt_config(tmp_path), (2000, 0, 0), open_dataset=open_indexed)["train"]
    tokens = np.array([open_indexed(p).sequence_lengths.sum() for p in corpora], dtype=np.float64)
    np.testing.assert_allclose(train.weights, tokens / tokens.sum())


def test_separate_split_paths_and_empty_split(tmp_path, corpora):
    a, b, c = corpora
    blend = BlendConfig(train_data_path=["0.6", a, "0.4", b], valid_data_path=[c])
    sets = build_gpt_datasets(blend, gpt_config(tmp_path), (500, 50, 10), open_dataset=open_indexed)
    assert isinstance(sets["train"], BlendedDataset) and sets["train"].datasets[0].document_range == (0, 150)
    assert isinstance(sets["valid"], GPTDataset) and sets["valid"].document_range == (0, 200)
    assert sets["test"] is None  # no test corpus given
    with pytest.raises(ValueError, match=r"the valid split of .*c1_text_document is empty"):
        build_gpt_datasets(BlendConfig(data_path=[b], split="995,4,1"), gpt_config(tmp_path), (100, 10, 10),
                           open_dataset=open_indexed)
    with pytest.raises(FileNotFoundError, match=r"--data-path .*nope: .*nope.idx and .*nope.bin must both exist"):
        build_gpt_datasets(BlendConfig(data_path=[str(tmp_path / "nope")]), gpt_config(tmp_path), (1, 1, 1))


# --- tools/build_index.py -----------------------------------------------------------------------

def test_build_index_cli(tmp_path, corpora, capsys):
    a, b, _ = corpora
    argv = ["--data-path", "0.7", a, "0.3", b, "--split", "90,10,0", "--seq-length", "8",
            "--train-iters", "20", "--global-batch-size", "16", "--eval-iters", "2", "--eval-interval", "10",
            "--data-cache-path", str(tmp_path / "cache")]
    assert build_index_main(argv) == 0
    out = capsys.readouterr().out
    assert "train: 320 samples requested" in out and "valid: 96 samples requested" in out  # (20//10+1)*2*16
    assert "built" in out and "test  (not built: no share in --split)" in out
    assert build_index_main(argv) == 0
    out = capsys.readouterr().out
    assert " built" not in out.replace("not built", "") and "loaded" in out
    assert build_index_main(argv + ["--split", "999,1,0"]) == 2
    assert "error: the valid split of" in capsys.readouterr().err


def test_build_index_script_runs(tmp_path):
    """The thin script parses flags and reports bad input without a traceback."""
    r = subprocess.run([sys.executable, str(REPO / "tools" / "build_index.py"), "--data-path", str(tmp_path / "x"),
                        "--seq-length", "8", "--train-samples", "10", "--global-batch-size", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "x.idx and" in r.stderr and "Traceback" not in r.stderr


def test_build_index_and_samples_on_real_text(tmp_path):
    """tinyshakespeare, GPT-2 BPE, two corpora blended: the CLI builds the cache, the datasets of a
    run hit it, and every EOD-free sample decodes to a passage of the text."""
    data = SHARED_DATA
    if not (data / "tinyshakespeare.txt").is_file() or not (data / "gpt2" / "vocab.json").is_file():
        pytest.skip(f"needs {data}/tinyshakespeare.txt and {data}/gpt2/ (shared test data)")
    from megapre.data.indexed import IndexedDatasetBuilder
    from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

    tok = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", vocab_file=str(data / "gpt2" / "vocab.json"),
                                          merge_file=str(data / "gpt2" / "merges.txt")))
    text = (data / "tinyshakespeare.txt").read_text()[:100_000]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    prefixes = []
    for i, part in enumerate((paragraphs[: len(paragraphs) // 2], paragraphs[len(paragraphs) // 2:])):
        prefixes.append(str(tmp_path / f"shakespeare{i}_text_document"))
        with IndexedDatasetBuilder(prefixes[-1], np.uint16) as builder:
            for ids in tok.encode_batch(part):
                builder.add_document(ids + [tok.eod])
            builder.finalize()
    flags = ["--data-path", "0.6", prefixes[0], "0.4", prefixes[1], "--split", "95,5,0", "--seq-length", "64",
             "--train-iters", "10", "--global-batch-size", "32", "--eval-iters", "2", "--eval-interval", "5",
             "--data-cache-path", str(tmp_path / "cache")]
    r = subprocess.run([sys.executable, str(REPO / "tools" / "build_index.py"), *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train: 320 samples requested" in r.stdout and "built" in r.stdout
    blend = BlendConfig(data_path=flags[1:5], split="95,5,0")
    cfg = GPTDatasetConfig(seq_length=64, eod_token=tok.eod, eod_mask_loss=True,
                           cache=CacheConfig(cache_dir=str(tmp_path / "cache")))
    sets = build_gpt_datasets(blend, cfg, (320, 192, 0))  # valid: (10 // 5 + 1) * 2 * 32
    assert sets["train"].cache_status == "loaded" and sets["valid"].cache_status == "loaded"
    checked = 0
    for i in range(0, 320, 2):
        sample = sets["train"][i]
        window = np.append(sample["tokens"], sample["labels"][-1])
        if tok.eod not in window:
            assert tok.decode(window.tolist()) in text
            checked += 1
        assert (sample["loss_mask"] == (sample["tokens"] != tok.eod)).all()
    assert checked > 10
