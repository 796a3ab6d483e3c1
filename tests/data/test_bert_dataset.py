"""BERT samples: the compiled sentence-pair mapping against a Python reference and megatron-core,
sample structure, truncation, sentence-order labels, determinism across processes, the cache, bad
input, and an end-to-end sample on real text."""
from __future__ import annotations

import dataclasses
import glob
import importlib.machinery
import importlib.util
import json
import multiprocessing as mp
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from megapre.cli.bert_samples import main as bert_main
from megapre.data.bert_dataset import (
    BertDataset,
    BertDatasetConfig,
    build_mapping,
    split_pair,
    truncate_pair,
)
from megapre.data.index_cache import CacheConfig
from megapre.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

DATA = SHARED_DATA
PAD, CLS, SEP, MASK = 0, 1, 2, 3
VOCAB = 500


# --- reference of the mapping algorithm (pure Python; same random streams) ----------------------


class MT19937_64:
    """64-bit Mersenne Twister (the generator of C++ std::mt19937_64)."""

    N, M, MASK64 = 312, 156, (1 << 64) - 1
    UPPER, LOWER = 0xFFFFFFFF80000000, 0x7FFFFFFF

    def __init__(self, seed: int) -> None:
        self.mt = [seed & self.MASK64]
        for i in range(1, self.N):
            prev = self.mt[-1]
            self.mt.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) & self.MASK64)
        self.i = self.N

    def _twist(self) -> None:
        mt = self.mt
        for k in range(self.N):
            x = (mt[k] & self.UPPER) | (mt[(k + 1) % self.N] & self.LOWER)
            y = x >> 1
            if x & 1:
                y ^= 0xB5026F5AA96619E9
            mt[k] = mt[(k + self.M) % self.N] ^ y
        self.i = 0

    def __call__(self) -> int:
        if self.i >= self.N:
            self._twist()
        y = self.mt[self.i]
        self.i += 1
        y ^= (y >> 29) & 0x5555555555555555
        y ^= (y << 17) & 0x71D67FFFEDA60000
        y ^= (y << 37) & 0xFFF7EEE000000000
        return y ^ (y >> 43)


class MT19937_32:
    """32-bit Mersenne Twister outputs (std::mt19937): numpy's legacy RandomState seeds it the same
    way and hands out raw words for a full-range uint32 draw."""

    def __init__(self, seed: int) -> None:
        self.rs = np.random.RandomState(seed)

    def __call__(self) -> int:
        return int(self.rs.randint(0, 2**32, dtype=np.uint32))


def reference_mapping(docs, lengths, num_epochs, max_num_samples, max_length, short_seq_prob, seed,
                      min_sentences, long_len=512):
    gen = MT19937_32(seed)
    ratio = int(round(1.0 / short_seq_prob)) if short_seq_prob > 0 else 0

    def target():
        if ratio == 0:
            return max_length
        r = gen()
        return 2 + r % (max_length - 1) if r % ratio == 0 else max_length

    rows = []
    for _ in range(num_epochs):
        if len(rows) >= max_num_samples:
            break
        before = len(rows)
        for d in range(len(docs) - 1):
            first, last = int(docs[d]), int(docs[d + 1])
            n = last - first
            if n < min_sentences or (n > 1 and max(lengths[first:last]) > long_len):
                continue
            start, tokens, count, t = first, 0, 0, target()
            for s in range(first, last):
                tokens += int(lengths[s])
                count += 1
                left = last - s - 1
                if (tokens >= t and left > 1 and count >= min_sentences) or left == 0:
                    rows.append((start, s + 1, t))
                    start, tokens, count, t = s + 1, 0, 0, target()
        if len(rows) == before:
            break
    shuffle = MT19937_64(seed + 1)
    for i in range(len(rows) - 1, 0, -1):
        j = shuffle() % (i + 1)
        rows[i], rows[j] = rows[j], rows[i]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def test_mt19937_references_match_the_cpp_standard():
    # The C++ standard fixes the 10000th output of each default-seeded (5489) engine.
    g32 = np.random.RandomState(5489).randint(0, 2**32, size=10000, dtype=np.uint32)
    assert int(g32[-1]) == 4123659995
    g64 = MT19937_64(5489)
    for _ in range(9999):
        g64()
    assert g64() == 9981545732273789042


def random_corpus(seed: int, num_docs: int = 400, max_sentences: int = 9, max_len: int = 60):
    rng = np.random.default_rng(seed)
    per_doc = rng.integers(0, max_sentences + 1, num_docs)
    docs = np.concatenate(([0], np.cumsum(per_doc))).astype(np.int64)
    lengths = rng.integers(1, max_len, int(docs[-1])).astype(np.int32)
    lengths[rng.integers(0, lengths.size, 6)] = 700  # over-long "sentences"
    return docs, lengths


MAPPING_CASES = [
    # num_epochs, max_num_samples, max_length, short_seq_prob, seed, min_sentences
    (1, 2**62, 125, 0.1, 1234, 2),
    (1, 2**62, 61, 0.0, 5, 1),
    (50, 1500, 40, 0.33, 77, 2),
    (3, 2**62, 509, 1.0, 9, 1),
]


@pytest.mark.parametrize("case", MAPPING_CASES)
def test_mapping_matches_python_reference(case):
    import megapre._C as C

    docs, lengths = random_corpus(case[4])
    got, info = C.data.build_bert_mapping(docs, lengths, *case, 512)
    want = reference_mapping(docs, lengths, *case)
    np.testing.assert_array_equal(got, want)
    assert info["epochs"] >= 1 and info["long_sentence_documents"] > 0


def _megatron_helpers():
    """megatron-core's compiled helpers, loaded straight from the wheel (importing megatron.core
    itself pulls in most of the library and takes seconds)."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for path in glob.glob(str(Path(root) / "core" / "datasets" / "helpers_cpp*.so")):
            loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", path)
            module_spec = importlib.util.spec_from_file_location("helpers_cpp", path, loader=loader)
            module = importlib.util.module_from_spec(module_spec)
            loader.exec_module(module)
            return module
    return None


@pytest.mark.parametrize("case", MAPPING_CASES)
def test_mapping_matches_megatron_core(case):
    import megapre._C as C

    helpers = _megatron_helpers()
    if helpers is None:
        pytest.skip("megatron-core is not installed (pip install megatron-core) or ships no compiled helpers")
    docs, lengths = random_corpus(case[4] + 1, num_docs=3000)
    ours, _ = C.data.build_bert_mapping(docs, lengths, *case, 512)
    theirs = helpers.build_mapping(docs, lengths, *case[:5], False, case[5])
    np.testing.assert_array_equal(ours, theirs.astype(np.int64))


def test_dataset_mapping_equals_megatron_core_call():
    """build_mapping with num_samples runs epochs like Megatron's BERT dataset (int32 max - 1
    epochs, stopping once num_samples rows exist)."""
    helpers = _megatron_helpers()
    if helpers is None:
        pytest.skip("megatron-core is not installed (pip install megatron-core) or ships no compiled helpers")
    docs, lengths = random_corpus(21, num_docs=500)
    ours, info = build_mapping(docs, lengths, max_length=125, short_seq_prob=0.1, seed=1234, binary_head=True,
                               num_samples=4000)
    theirs = helpers.build_mapping(docs, lengths, np.iinfo(np.int32).max - 1, 4000, 125, 0.1, 1234, False, 2)
    np.testing.assert_array_equal(ours, theirs.astype(np.int64))
    assert len(ours) >= 4000 and info["epochs"] > 1


def test_mapping_rows_are_well_formed():
    docs, lengths = random_corpus(11, num_docs=2000)
    rows, info = build_mapping(docs, lengths, max_length=100, short_seq_prob=0.1, seed=3, binary_head=True,
                               num_samples=None)
    doc_of = np.searchsorted(docs, rows[:, 0], side="right") - 1
    assert (rows[:, 1] - rows[:, 0] >= 2).all()  # a pair needs two sentences
    assert (rows[:, 1] <= docs[doc_of + 1]).all()  # never crosses a document
    assert ((rows[:, 2] >= 2) & (rows[:, 2] <= 100)).all()
    assert 0.05 < (rows[:, 2] < 100).mean() < 0.15  # short targets about 1 in 10
    # Every sentence of a usable document appears exactly once in a one-epoch mapping.
    covered = np.zeros(lengths.size, dtype=int)
    for a, b, _ in rows:
        covered[a:b] += 1
    usable = [(docs[d], docs[d + 1]) for d in range(len(docs) - 1)
              if docs[d + 1] - docs[d] >= 2 and lengths[docs[d]:docs[d + 1]].max() <= 512]
    for a, b in usable:
        assert (covered[a:b] == 1).all()
    assert covered.sum() == sum(b - a for a, b in usable)


def test_mapping_rejects_bad_input():
    import megapre._C as C

    lengths = np.ones(10, dtype=np.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        C.data.build_bert_mapping(np.array([0, 5, 3, 10]), lengths, 1, 100, 50, 0.1, 1, 2, 512)
    with pytest.raises(ValueError, match="within"):
        C.data.build_bert_mapping(np.array([0, 5, 11]), lengths, 1, 100, 50, 0.1, 1, 2, 512)
    with pytest.raises(ValueError, match="short_seq_prob"):
        C.data.build_bert_mapping(np.array([0, 10]), lengths, 1, 100, 50, 1.5, 1, 2, 512)
    with pytest.raises(ValueError, match="max_length"):
        C.data.build_bert_mapping(np.array([0, 10]), lengths, 1, 100, 1, 0.1, 1, 2, 512)


def test_epochs_stop_when_no_document_is_usable():
    import megapre._C as C

    docs = np.array([0, 1, 2, 3], dtype=np.int64)  # three one-sentence documents
    rows, info = C.data.build_bert_mapping(docs, np.full(3, 5, np.int32), 2**31 - 2, 1000, 50, 0.1, 1, 2, 512)
    assert rows.shape == (0, 3) and info["short_documents"] == 3 and info["epochs"] == 1


# --- pair construction --------------------------------------------------------------------------


def megatron_style_truncation(la: int, lb: int, target: int) -> tuple[int, int]:
    while la + lb > target:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


def test_truncation_follows_the_longer_side_rule():
    rng = np.random.default_rng(0)
    for la in range(0, 14):
        for lb in range(0, 14):
            for target in range(2, 26):
                a, b = np.arange(la), 100 + np.arange(lb)
                ta, tb, truncated = truncate_pair(a, b, target, rng)
                assert (ta.size, tb.size) == megatron_style_truncation(la, lb, target)
                assert truncated == (la + lb > target)
                # Each kept part is one contiguous piece of its segment.
                assert ta.size == 0 or (np.diff(ta) == 1).all()
                assert tb.size == 0 or (np.diff(tb) == 1).all()


def test_truncation_takes_front_and_back_evenly():
    rng = np.random.default_rng(1)
    fronts = [truncate_pair(np.arange(100), np.arange(10), 50, rng)[0][0] for _ in range(2000)]
    assert abs(np.mean(fronts) - 30) < 0.6  # 60 tokens removed from A, half of them from its front


def test_split_pair_sentence_order_labels():
    rng = np.random.default_rng(2)
    sents = [np.full(3, i) for i in range(5)]
    swaps = 0
    for _ in range(2000):
        a, b, swapped = split_pair(sents, True, rng)
        first, second = (b, a) if swapped else (a, b)
        np.testing.assert_array_equal(np.concatenate((first, second)), np.repeat(np.arange(5), 3))
        assert a.size and b.size
        swaps += swapped
    assert abs(swaps / 2000 - 0.5) < 0.04
    a, b, swapped = split_pair(sents, False, rng)
    assert b.size == 0 and not swapped and a.size == 15
    with pytest.raises(ValueError, match="at least 2 sentences"):
        split_pair(sents[:1], True, rng)


# --- the dataset on a fake corpus -----------------------------------------------------------------


def write_corpus(prefix: Path, documents: list[list[np.ndarray]]) -> IndexedDataset:
    """An indexed dataset with one sequence per sentence, as preprocess --split-sentences writes."""
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for doc in documents:
            builder.add_document(np.concatenate(doc) if doc else np.zeros(0, np.uint16), [len(x) for x in doc])
        builder.finalize()
    return IndexedDataset(prefix)


class FakeTokenizer:
    name = "fake-wordpiece"
    vocab_size = VOCAB
    pad, cls, sep, mask = PAD, CLS, SEP, MASK

    def continuation_mask(self) -> np.ndarray:
        m = np.zeros(VOCAB, dtype=bool)
        m[300:] = True
        return m


def fake_corpus(tmp_path: Path, seed: int = 0, num_docs: int = 120) -> IndexedDataset:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(1, 8))
        docs.append([rng.integers(4, VOCAB, int(rng.integers(3, 40))).astype(np.uint16) for _ in range(n)])
    return write_corpus(tmp_path / f"corpus{seed}_text_sentence", docs)


def bert(corpus, cfg: BertDatasetConfig, tokenizer=None, split: str = "train", document_range=None,
         num_samples=None, cache_dir=None) -> BertDataset:
    """A BertDataset; its mapping cached in `cache_dir`, else in memory only."""
    cache = CacheConfig(cache_dir=str(cache_dir)) if cache_dir else CacheConfig(enabled=False)
    return BertDataset(corpus, tokenizer or FakeTokenizer(), split, document_range, num_samples,
                       dataclasses.replace(cfg, cache=cache))


def unmask(sample: dict) -> np.ndarray:
    text = sample["text"].copy()
    sel = sample["loss_mask"] == 1
    text[sel] = sample["labels"][sel]
    return text


def test_samples_are_well_formed_pairs(tmp_path):
    corpus = fake_corpus(tmp_path)
    cfg = BertDatasetConfig(seq_length=64, short_seq_prob=0.1, seed=5)
    ds = bert(corpus, cfg)
    assert len(ds) > 50
    swaps = truncations = 0
    for idx in range(len(ds)):
        s = ds[idx]
        target = int(ds.mapping[idx][2])
        assert all(v.dtype == np.int64 for v in s.values())
        n = int(s["padding_mask"].sum())
        assert (s["padding_mask"][:n] == 1).all() and n <= 64
        text = unmask(s)
        assert (text[n:] == PAD).all() and (s["labels"][n:] == -1).all() and (s["loss_mask"][n:] == 0).all()
        seps = check_pair(s, text, source_tokens(corpus, ds.mapping[idx]), target, CLS, SEP)
        assert (s["labels"][s["loss_mask"] == 0] == -1).all()
        assert s["loss_mask"].sum() >= 1 and s["loss_mask"][[0, *seps]].sum() == 0
        swaps += int(s["is_random"])
        truncations += int(s["truncated"])
    assert abs(swaps / len(ds) - 0.5) < 0.12
    assert truncations > 0


def source_tokens(indexed, row) -> np.ndarray:
    return np.concatenate([np.asarray(indexed[i], dtype=np.int64) for i in range(row[0], row[1])])


def check_pair(s: dict, text: np.ndarray, source: np.ndarray, target: int, cls: int, sep: int) -> np.ndarray:
    """[CLS] A [SEP] B [SEP] with types 0/1; A and B (in sentence order) are the source's tokens,
    whole or, when truncated, each one contiguous piece. Returns the [SEP] positions."""
    n = int(s["padding_mask"].sum())
    seps = np.flatnonzero(text[:n] == sep)
    assert text[0] == cls and seps.size == 2 and seps[1] == n - 1
    a, b = text[1:seps[0]], text[seps[0] + 1:n - 1]
    assert (s["types"][:seps[0] + 1] == 0).all() and (s["types"][seps[0] + 1:n] == 1).all()
    assert a.size + b.size <= target and a.size and b.size
    first_seg, second_seg = (b, a) if s["is_random"] else (a, b)
    if not s["truncated"]:
        np.testing.assert_array_equal(np.concatenate((first_seg, second_seg)), source)
    else:
        assert a.size + b.size < source.size
        assert _contains(source, first_seg) and _contains(source, second_seg)
    return seps


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    h, n = haystack.tobytes(), needle.astype(haystack.dtype).tobytes()
    return any(h[i:i + len(n)] == n for i in range(0, len(h) - len(n) + 1, haystack.itemsize))


def test_without_binary_head_single_sentence_documents_count(tmp_path):
    docs = [[np.arange(4, 20, dtype=np.uint16)] for _ in range(30)]
    corpus = write_corpus(tmp_path / "one_sentence", docs)
    ds = bert(corpus, BertDatasetConfig(seq_length=32, binary_head=False))
    assert len(ds) == 30
    s = ds[0]
    assert s["is_random"] == 0 and (s["types"] == 0).all()
    n = int(s["padding_mask"].sum())
    assert n == 18 and unmask(s)[[0, n - 1]].tolist() == [CLS, SEP]
    with pytest.raises(ValueError, match="valid split .*one_sentence.*no usable document.*30 too short.*--split-sentences"):
        bert(corpus, BertDatasetConfig(seq_length=32), split="valid")


def test_num_samples_walks_epochs_and_document_range_limits(tmp_path):
    corpus = fake_corpus(tmp_path, 1)
    cfg = BertDatasetConfig(seq_length=64)
    one = bert(corpus, cfg)
    many = bert(corpus, cfg, num_samples=5 * len(one))
    assert len(many) >= 5 * len(one) and many.mapping_info["epochs"] >= 5
    part = bert(corpus, cfg, document_range=(10, 40))
    lo, hi = corpus.document_indices[10], corpus.document_indices[40]
    assert (part.mapping[:, 0] >= lo).all() and (part.mapping[:, 1] <= hi).all()


def test_same_index_same_sample(tmp_path):
    corpus = fake_corpus(tmp_path, 2)
    cfg = BertDatasetConfig(seq_length=48, max_ngrams=3, seed=9)
    ds1, ds2 = bert(corpus, cfg), bert(IndexedDataset(corpus.path_prefix), cfg)
    for idx in (0, 7, len(ds1) - 1):
        _assert_same(ds1[idx], ds2[idx])
        _assert_same(ds1[idx], ds1[idx])
    assert any(not np.array_equal(ds1[0]["text"], ds1[i]["text"]) for i in range(1, 5))
    other = bert(corpus, BertDatasetConfig(seq_length=48, max_ngrams=3, seed=10))
    assert not all(np.array_equal(ds1[i]["text"], other[i]["text"]) for i in range(5))
    _assert_same(ds1[-1], ds1[len(ds1) - 1])
    with pytest.raises(IndexError, match="out of range"):
        ds1[len(ds1)]


def _assert_same(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _worker_samples(dataset: BertDataset, indices: list[int]) -> list[dict]:
    return [dataset[i] for i in indices]


@pytest.mark.slow
def test_worker_processes_build_the_same_samples(tmp_path):
    ds = bert(fake_corpus(tmp_path, 3), BertDatasetConfig(seq_length=48, seed=4), cache_dir=tmp_path / "cache")
    indices = [5, 0, 17, 3]
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.starmap(_worker_samples, [(ds, indices), (ds, indices[::-1])])
    for i, idx in enumerate(indices):
        _assert_same(got[0][i], ds[idx])
        _assert_same(got[1][len(indices) - 1 - i], ds[idx])


def test_mapping_cache_is_keyed_by_its_definition(tmp_path):
    corpus = fake_corpus(tmp_path, 4)
    cache = tmp_path / "cache"
    cfg = BertDatasetConfig(seq_length=64, seed=1)
    first = bert(corpus, cfg, cache_dir=cache)
    assert first.cache_status == "built"
    names = sorted(p.name.split("-", 1)[1] for p in cache.glob("*.*") if not p.name.endswith(".lock"))
    assert names == ["BertDataset-description.json", "BertDataset-document_counts.npy", "BertDataset-mapping.npy"]
    again = bert(corpus, cfg, cache_dir=cache)
    assert again.cache_status == "loaded" and isinstance(again.mapping, np.memmap)
    np.testing.assert_array_equal(first.mapping, again.mapping)
    assert again.mapping_info == first.mapping_info and first.mapping_info["epochs"] == 1
    # Masking settings do not change the mapping; the seed, the split and num_samples do.
    assert bert(corpus, BertDatasetConfig(seq_length=64, seed=1, max_ngrams=1), cache_dir=cache).cache_status == "loaded"
    keys = {first.cache_key}
    for other in (bert(corpus, BertDatasetConfig(seq_length=64, seed=2), cache_dir=cache),
                  bert(corpus, BertDatasetConfig(seq_length=80, seed=1), cache_dir=cache),
                  bert(corpus, cfg, document_range=(0, 50), cache_dir=cache),
                  bert(corpus, cfg, num_samples=1000, cache_dir=cache)):
        assert other.cache_status == "built"
        keys.add(other.cache_key)
    assert len(keys) == 5
    # The default cache directory is index-cache/ beside the data.
    default = BertDataset(corpus, FakeTokenizer(), "train", None, None, cfg)
    assert default.cache_status == "built" and Path(default.cache_paths["mapping"]).parent == tmp_path / "index-cache"


def test_bad_input_is_named(tmp_path):
    corpus = fake_corpus(tmp_path, 5)

    class NoMask(FakeTokenizer):
        mask = None

    with pytest.raises(ValueError, match=r"tokenizer fake-wordpiece has none for \['mask'\]"):
        bert(corpus, BertDatasetConfig(seq_length=64), NoMask())
    with pytest.raises(ValueError, match=r"test split of .*corpus5_text_sentence: document range \[50, 500\) is outside"):
        bert(corpus, BertDatasetConfig(seq_length=64), split="test", document_range=(50, 500))
    with pytest.raises(ValueError, match=r"valid split .* is empty: documents \[7, 7\)"):
        bert(corpus, BertDatasetConfig(seq_length=64), split="valid", document_range=(7, 7))
    with pytest.raises(ValueError, match="num_samples=0"):
        bert(corpus, BertDatasetConfig(seq_length=64), num_samples=0)
    with pytest.raises(ValueError, match="seq_length=4"):
        BertDatasetConfig(seq_length=4)
    with pytest.raises(ValueError, match="mask_prob"):
        BertDatasetConfig(mask_prob=0.0)

    class SmallVocab(FakeTokenizer):
        vocab_size = 100

        def continuation_mask(self):
            return np.zeros(100, dtype=bool)

    ds = bert(corpus, BertDatasetConfig(seq_length=64), SmallVocab())
    with pytest.raises(ValueError, match="different vocabulary"):
        ds[0]


# --- end to end on real text --------------------------------------------------------------------


def test_end_to_end_on_wikitext(tmp_path, capsys):
    vocab, wiki = DATA / "bert" / "vocab.txt", DATA / "wikitext-2" / "valid.txt"
    if not (vocab.exists() and wiki.exists()):
        pytest.skip(f"needs {vocab} and {wiki} (the shared data folder)")
    from megapre.cli.preprocess_data import main as preprocess

    paragraphs = [p.strip() for p in wiki.read_text(encoding="utf-8").split("\n") if len(p) > 300][:40]
    with open(tmp_path / "wiki.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    rc = preprocess(["--input", str(tmp_path / "wiki.jsonl"), "--output-prefix", str(tmp_path / "wiki"),
                     "--split-sentences", "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(vocab),
                     "--workers", "1"])
    assert rc == 0
    indexed = IndexedDataset(tmp_path / "wiki_text_sentence")
    assert indexed.num_documents == 40 and len(indexed) > 150  # sentences
    tok = build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file=str(vocab)))
    cfg = BertDatasetConfig(seq_length=128, max_ngrams=3, seed=7)
    ds = BertDataset(indexed, tok, "train", None, None, cfg)  # mapping cached in tmp_path/index-cache
    assert len(ds) >= 40
    predicted = ordinary = swaps = 0
    for idx in range(len(ds)):
        s = ds[idx]
        text = unmask(s)
        n = int(s["padding_mask"].sum())
        check_pair(s, text, source_tokens(indexed, ds.mapping[idx]), int(ds.mapping[idx][2]), tok.cls, tok.sep)
        swaps += int(s["is_random"])
        # Whole words: a predicted "##" piece always follows a predicted piece.
        cont = tok.continuation_mask()[text[:n]]
        pred = s["loss_mask"][:n] == 1
        prev_ordinary = ~np.isin(text[:n - 1], [tok.cls, tok.sep])
        assert not (pred[1:] & cont[1:] & ~pred[:-1] & prev_ordinary).any()
        predicted += pred.sum()
        ordinary += n - 3
    assert 0.12 < predicted / ordinary < 0.16
    assert 0.25 < swaps / len(ds) < 0.75
    # Real text back: each row's sentences decode to a run of the source text (compared without
    # whitespace, case and accents, which the uncased tokenizer drops).
    corpus_text = _normalized(" ".join(paragraphs))
    decoded = [tok.decode(source_tokens(indexed, row).tolist()) for row in ds.mapping]
    assert all(_normalized(d) in corpus_text for d in decoded if "[UNK]" not in d)
    assert sum("[UNK]" not in d for d in decoded) > 0.8 * len(decoded)
    # The command line over the same files: the valid split's mapping, statistics, decoded samples.
    rc = bert_main(["--data-path", str(tmp_path / "wiki_text_sentence"), "--vocab-file", str(vocab),
                    "--seq-length", "64", "--split", "80,20", "--split-name", "valid", "--show", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"valid split of .*wiki_text_sentence: documents \[32, 40\), \d+ samples in 1 epoch", out)
    assert "of ordinary tokens predicted" in out and "sample 0 (sentences" in out and "[CLS]" in out
    rc = bert_main(["--data-path", str(tmp_path / "wiki_text_sentence"), "--vocab-file", str(vocab),
                    "--split", "100,0", "--split-name", "valid"])
    assert rc == 2 and "gives the valid split no share" in capsys.readouterr().err
    rc = bert_main(["--data-path", str(tmp_path / "missing"), "--vocab-file", str(vocab)])
    assert rc == 2 and "missing.idx" in capsys.readouterr().err


def _normalized(text: str) -> str:
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) != "Mn")


def test_dataloader_collates_batches(tmp_path):
    import torch

    ds = bert(fake_corpus(tmp_path, 6), BertDatasetConfig(seq_length=40))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert set(batch) == {"text", "types", "labels", "is_random", "loss_mask", "padding_mask", "truncated"}
    assert batch["text"].shape == (4, 40) and batch["text"].dtype == torch.int64
    assert batch["is_random"].shape == (4,) and batch["truncated"].shape == (4,)
    np.testing.assert_array_equal(batch["labels"][2].numpy(), ds[2]["labels"])


def test_blends_like_gpt_datasets(tmp_path):
    from megapre.data.blend import BlendedDataset, samples_per_dataset

    cfg = BertDatasetConfig(seq_length=48, cache=CacheConfig(cache_dir=str(tmp_path / "cache")))
    corpora = [fake_corpus(tmp_path, 7), fake_corpus(tmp_path, 8)]
    weights, size = [0.25, 0.75], 400
    parts = [BertDataset(c, FakeTokenizer(), "train", None, n, cfg)
             for c, n in zip(corpora, samples_per_dataset(size, weights))]
    blend = BlendedDataset(parts, weights, size, cfg.cache, "train")
    assert len(blend) == size and blend.cache_status == "built"
    np.testing.assert_array_equal(np.bincount(blend.dataset_index), [100, 300])
    i = int(np.flatnonzero(np.asarray(blend.dataset_index) == 1)[0])
    _assert_same(blend[i], parts[1][int(blend.dataset_sample_index[i])])
