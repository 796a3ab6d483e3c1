"""Training-start data checks (issue 10): tokenizer fingerprint recorded by preprocessing (and
carried by merges) against the run's, token ids against the vocabulary, BERT's need for
sentence-split data and [CLS]/[SEP]/[MASK], empty splits, and the warnings for a validation split
with no share and a dataset shorter than one sample. Data errors are ConfigErrors: one line, exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, write_counting_corpus
from megapre.cli.flags import parse_config
from megapre.cli.merge_datasets import main as merge_main
from megapre.cli.preprocess_data import main as preprocess_main
from megapre.data.errors import DataError
from megapre.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from megapre.data.index_cache import CacheConfig
from megapre.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megapre.data.stats_file import find_dataset_stats
from megapre.data.tokenizer_check import CheckedOpener, DataCheckConfig
from megapre.data.tokenizers import TokenizerConfig, build_tokenizer
from megapre.errors import ConfigError
from megapre.train.data import build_splits

ROOT = Path(__file__).resolve().parents[2]
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200))


def preprocess(tmp_path: Path, name: str, *tok: str, extra: tuple[str, ...] = ()) -> str:
    src = tmp_path / f"{name}.txt"
    src.write_text(TEXT)
    assert preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / name),
                            "--workers", "0", "--progress-interval", "0", "--append-eod",
                            *tok, *extra]) == 0
    return str(tmp_path / f"{name}_text_{'sentence' if extra else 'document'}")


BYTE = ("--tokenizer-type", "ByteLevelTokenizer")
def char_tokenizer(tmp_path: Path):
    vocab = tmp_path / "chars.json"
    from megapre.data.tokenizers import write_char_vocab
    write_char_vocab(vocab, sorted(set(TEXT)), ("eod",))
    return build_tokenizer(TokenizerConfig("CharacterTokenizer", vocab_file=str(vocab)))


def config(prefix: str, tmp_path: Path, *extra: str, model: str = "gpt", tok=BYTE):
    return parse_config(["--model", model, "--num-layers", "1", "--hidden-size", "32",
                         "--num-attention-heads", "4", "--seq-length", "16",
                         "--micro-batch-size", "2", "--global-batch-size", "2",
                         "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
                         "--data-path", prefix, "--data-cache-path", str(tmp_path / "cache"),
                         "--split", "90,5,5",
                         *tok, *extra])


# ----------------------------------------------------------------------------- fingerprints

def test_data_made_with_another_tokenizer_is_refused_in_one_line(tmp_path, capsys):
    chars = char_tokenizer(tmp_path)
    char_flags = ("--tokenizer-type", "CharacterTokenizer", "--vocab-file", str(tmp_path / "chars.json"))
    prefix = preprocess(tmp_path, "c", *char_flags)
    byte = build_tokenizer(TokenizerConfig("ByteLevelTokenizer"))   # ids of chars fit its vocab
    with pytest.raises(ConfigError) as e:
        build_splits(config(prefix, tmp_path), byte)
    msg = str(e.value)
    assert "\n" not in msg and prefix in msg and "--allow-tokenizer-mismatch" in msg
    assert byte.fingerprint()[:12] in msg and chars.fingerprint()[:12] in msg
    assert "ByteLevelTokenizer" in msg and "CharacterTokenizer" in msg
    splits = build_splits(config(prefix, tmp_path, "--allow-tokenizer-mismatch"), byte)
    assert splits.train is not None
    assert "warning:" in capsys.readouterr().err
    assert build_splits(config(prefix, tmp_path, tok=char_flags), chars).train is not None


def test_merged_data_carries_the_fingerprint_when_inputs_agree(tmp_path, capsys):
    a, b = preprocess(tmp_path, "a", *BYTE), preprocess(tmp_path, "b", *BYTE)
    out = str(tmp_path / "ab_text_document")
    assert merge_main(["--input", a, b, "--output-prefix", out]) == 0
    byte = build_tokenizer(TokenizerConfig("ByteLevelTokenizer"))
    path, stats = find_dataset_stats(out)
    assert path == Path(out + ".stats.json") and stats["tokenizer"]["fingerprint"] == byte.fingerprint()
    with pytest.raises(DataError, match="made with tokenizer ByteLevelTokenizer"):
        build_splits(config(out, tmp_path), char_tokenizer(tmp_path))
    sub = tmp_path / "other"
    sub.mkdir()
    vocab = tmp_path / "chars.json"
    c = preprocess(sub, "c", "--tokenizer-type", "CharacterTokenizer", "--vocab-file", str(vocab))
    assert merge_main(["--input", a, c, "--output-prefix", str(tmp_path / "ac")]) == 1
    assert "different tokenizers" in capsys.readouterr().err


def test_data_without_stats_is_checked_for_ids_outside_the_vocabulary(tmp_path):
    prefix = str(tmp_path / "ids16")
    with IndexedDatasetBuilder(prefix, np.int16) as b:       # dtype code 3: 40000 reads negative
        for _ in range(20):
            b.add_document(np.array([1, 2, 40000 - 65536, 3] * 10, dtype=np.int16))
    tok = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=50))
    with pytest.raises(DataError, match=r"ids16\.bin: token id -25536 \(int16\) is outside .*\[0, 51\)"):
        CheckedOpener(tok, DataCheckConfig())(prefix)
    big = write_counting_corpus(tmp_path / "count", docs=20)   # ids up to 39
    small = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=10))
    with pytest.raises(DataError, match=r"count\.bin: token id 39 .*\[0, 11\)"):
        CheckedOpener(small, DataCheckConfig())(big)


def test_samples_are_checked_against_the_vocabulary(tmp_path):
    prefix = write_counting_corpus(tmp_path / "count", docs=20)
    cfg = GPTDatasetConfig(seq_length=8, cache=CacheConfig(enabled=False), vocab_size=20)
    ds = GPTDataset(IndexedDataset(prefix), "train", (0, 20), 50, cfg)
    with pytest.raises(DataError, match=r"count\.bin: sample \d+ \(train split\) holds token id"):
        for i in range(len(ds)):
            ds[i]


# ----------------------------------------------------------------------------- BERT

def test_bert_refuses_document_level_data_and_a_gpt2_tokenizer(tmp_path):
    vocab = SHARED_DATA / "bert" / "vocab.txt"
    if not vocab.is_file():
        pytest.skip(f"{vocab} absent")
    bert_tok = ("--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(vocab))
    docs = preprocess(tmp_path, "d", *bert_tok)
    tok = build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file=str(vocab)))
    with pytest.raises(ConfigError, match="needs sentence-split data.*--split-sentences"):
        build_splits(config(docs, tmp_path, model="bert", tok=bert_tok), tok)
    no_pairs = config(docs, tmp_path, "--no-bert-binary-head", model="bert", tok=bert_tok)
    assert build_splits(no_pairs, tok).train is not None      # no pairs: documents will do
    byte = build_tokenizer(TokenizerConfig("ByteLevelTokenizer"))
    with pytest.raises(ConfigError, match="--model bert needs .*BertWordPieceLowerCase"):
        build_splits(config(docs, tmp_path, model="bert"), byte)


# ----------------------------------------------------------------------------- splits

def test_empty_split_names_the_split_and_the_document_count(tmp_path):
    prefix = write_counting_corpus(tmp_path / "count", docs=10)
    tok = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=39))
    cfg = config(prefix, tmp_path, "--split", "98,1,1", tok=("--tokenizer-type", "NullTokenizer",
                                                              "--vocab-size", "39"))
    with pytest.raises(ConfigError, match=r"valid split of .*count is empty: .* 10 documents"):
        build_splits(cfg, tok)


def test_no_validation_share_warns_and_a_tiny_dataset_says_how_often_it_repeats(tmp_path, capsys):
    prefix = str(tmp_path / "tiny")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document(np.arange(10, dtype=np.uint16))          # 10 tokens < seq 16 + 1
    tok = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=39))
    cfg = config(prefix, tmp_path, "--split", "100,0,0",
                 tok=("--tokenizer-type", "NullTokenizer", "--vocab-size", "39"))
    splits = build_splits(cfg, tok)
    assert splits.valid is None
    err = capsys.readouterr().err
    assert "validation is off" in err and "--eval-interval 2" in err
    assert "fewer than one sample" in err and "read 13 times" in err   # 8 samples * 16 + 1 = 129 tokens


def test_pretrain_prints_data_errors_in_one_line(tmp_path):
    prefix = write_counting_corpus(tmp_path / "count", docs=20)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(40)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "megapre.pretrain", "--num-layers", "1", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "2", "--device", "cpu",
            "--data-path", prefix, "--data-cache-path", str(tmp_path / "cache")]
    for extra, needle in [(["--tokenizer-type", "NullTokenizer", "--vocab-size", "39"], "count.idx"),
                          (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                            str(tmp_path / "nope.json"), "--merge-file", str(tmp_path / "m.txt")],
                           "nope.json")]:
        proc = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in lines[-1] and lines[-1].startswith("megapre.pretrain: error:")
