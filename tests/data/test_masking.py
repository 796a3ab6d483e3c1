"""Masked-LM corruption: rates, whole words, n-grams, special tokens, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from megapre.data.masking import Masker, MaskingConfig, ngram_probabilities

PAD, CLS, SEP, MASK = 0, 1, 2, 3
VOCAB = 1000
CONTINUATION = np.zeros(VOCAB, dtype=bool)
CONTINUATION[600:] = True  # ids 600.. play WordPiece "##x" pieces
SPECIAL = (PAD, CLS, SEP, MASK)


def make_masker(**kw) -> Masker:
    return Masker(MaskingConfig(**kw), VOCAB, MASK, SPECIAL, CONTINUATION)


def pair(rng: np.random.Generator, la: int, lb: int) -> np.ndarray:
    """[CLS] A [SEP] B [SEP] with random ordinary tokens (about 1 in 3 a continuation piece)."""
    body = rng.integers(4, VOCAB, la + lb)
    return np.concatenate(([CLS], body[:la], [SEP], body[la:], [SEP])).astype(np.int64)


def word_ids(tokens: np.ndarray) -> np.ndarray:
    """Reference word numbering: -1 on specials; a continuation piece after an ordinary token
    belongs to that token's word."""
    ids = np.full(tokens.size, -1)
    w = -1
    for i, t in enumerate(tokens):
        if t in SPECIAL:
            continue
        if not (CONTINUATION[t] and i > 0 and tokens[i - 1] not in SPECIAL):
            w += 1
        ids[i] = w
    return ids


def test_rates_match_bert_80_10_10():
    m = make_masker(whole_word=False, max_ngrams=1)
    rng = np.random.default_rng(0)
    predicted = ordinary = masked = randomized = kept = 0
    for _ in range(1500):
        t = pair(rng, 60, 63)
        out = m(t, rng)
        sel = out.loss_mask == 1
        n_ord = 123
        assert sel.sum() == round(0.15 * n_ord)  # exact budget without whole words
        ordinary += n_ord
        predicted += sel.sum()
        masked += (out.tokens[sel] == MASK).sum()
        kept += (out.tokens[sel] == t[sel]).sum()
        randomized += ((out.tokens[sel] != MASK) & (out.tokens[sel] != t[sel])).sum()
        np.testing.assert_array_equal(out.labels[sel], t[sel])
        assert (out.labels[~sel] == -1).all() and (out.tokens[~sel] == t[~sel]).all()
    assert abs(predicted / ordinary - 0.15) < 0.005
    assert abs(masked / predicted - 0.8) < 0.015
    assert abs(randomized / predicted - 0.1) < 0.01  # a random draw equal to the original counts as kept
    assert abs(kept / predicted - 0.1) < 0.01


def test_special_tokens_never_predicted_nor_inserted():
    m = make_masker(max_ngrams=3)
    rng = np.random.default_rng(1)
    for _ in range(300):
        t = pair(rng, int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        t[rng.integers(1, t.size, 3)] = MASK  # literal [MASK]s in the text are special too
        out = m(t, rng)
        special = np.isin(t, SPECIAL)
        assert (out.loss_mask[special] == 0).all()
        assert (out.tokens[special] == t[special]).all()
        changed = out.tokens != t
        assert not np.isin(out.tokens[changed & (out.tokens != MASK)], SPECIAL).any()


@pytest.mark.parametrize("max_ngrams", [1, 3])
def test_whole_word_masking_never_splits_a_word(max_ngrams):
    m = make_masker(whole_word=True, max_ngrams=max_ngrams)
    rng = np.random.default_rng(2)
    total = predicted = 0
    for _ in range(500):
        t = pair(rng, 50, 70)
        ids = word_ids(t)
        out = m(t, rng)
        for w in range(ids.max() + 1):
            marks = out.loss_mask[ids == w]
            assert marks.min() == marks.max(), f"word {w} of {t.tolist()} split: {marks.tolist()}"
        total += (ids >= 0).sum()
        predicted += out.loss_mask.sum()
    assert 0.13 < predicted / total <= 0.15  # words that would overshoot the budget are skipped


def test_without_whole_word_continuations_are_separate_units():
    m = make_masker(whole_word=False)
    t = np.array([CLS, 10, 700, 701, 702, 11, SEP], dtype=np.int64)
    words = m.words(t)
    assert words.start.tolist() == [1, 2, 3, 4, 5]
    wm = make_masker(whole_word=True)
    words = wm.words(t)
    assert words.start.tolist() == [1, 5] and words.end.tolist() == [5, 6]
    # A continuation piece right after a special token starts its own word.
    words = wm.words(np.array([CLS, 700, 10, SEP, 701, SEP], dtype=np.int64))
    assert words.start.tolist() == [1, 2, 4] and words.end.tolist() == [2, 3, 5]
    assert words.run_last.tolist() == [1, 1, 2]


def test_ngram_spans_respect_max_n_and_segments():
    m = make_masker(whole_word=True, max_ngrams=3)
    rng = np.random.default_rng(3)
    sizes = np.zeros(4, dtype=np.int64)
    for _ in range(400):
        t = pair(rng, 200, 200)
        ids = word_ids(t)
        spans = m.choose_spans(t, rng)
        taken = np.zeros(t.size, dtype=int)
        for a, b in spans:
            taken[a:b] += 1
            assert (ids[a:b] >= 0).all(), "a span crosses a special token"
            assert a == 0 or ids[a - 1] != ids[a], "span starts inside a word"
            assert b == t.size or ids[b] != ids[b - 1], "span ends inside a word"
            n = np.unique(ids[a:b]).size
            assert ids[b - 1] - ids[a] + 1 == n  # consecutive words
            assert 1 <= n <= 3
            sizes[n] += 1
        assert taken.max() <= 1, "spans overlap"
    freq = sizes[1:] / sizes.sum()
    # Harmonic P(n) = 6/11, 3/11, 2/11; overlaps and the budget favour short spans a little.
    np.testing.assert_allclose(freq, [6 / 11, 3 / 11, 2 / 11], atol=0.06)
    assert freq[0] > freq[1] > freq[2]


def test_ngram_probabilities_are_the_named_ones():
    np.testing.assert_allclose(ngram_probabilities(3, "harmonic"), [6 / 11, 3 / 11, 2 / 11])
    g = ngram_probabilities(4, "geometric", 0.2)
    np.testing.assert_allclose(g, np.array([1, 0.8, 0.64, 0.512]) / 2.952)
    np.testing.assert_allclose(ngram_probabilities(1, "geometric"), [1.0])
    with pytest.raises(ValueError, match="ngram_distribution"):
        ngram_probabilities(3, "zipf")


def test_same_generator_state_same_result():
    m = make_masker(max_ngrams=2, ngram_distribution="geometric")
    t = pair(np.random.default_rng(4), 100, 100)
    a = m(t, np.random.default_rng((7, 42)))
    b = m(t, np.random.default_rng((7, 42)))
    c = m(t, np.random.default_rng((7, 43)))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.loss_mask, c.loss_mask)


def test_edge_cases():
    m = make_masker()
    rng = np.random.default_rng(5)
    empty = m(np.array([CLS, SEP, SEP], dtype=np.int64), rng)
    assert empty.loss_mask.sum() == 0 and (empty.labels == -1).all()
    assert m(np.zeros(0, dtype=np.int64), rng).tokens.size == 0
    one = m(np.array([CLS, 17, SEP], dtype=np.int64), rng)
    assert one.loss_mask.tolist() == [0, 1, 0]  # at least one prediction per sample
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        m(np.array([CLS, VOCAB + 5, SEP], dtype=np.int64), rng)


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"mask_prob": 0.0}, "mask_prob"),
        ({"mask_prob": 1.5}, "mask_prob"),
        ({"mask_token_prob": 0.95, "random_token_prob": 0.1}, "mask_token_prob"),
        ({"max_ngrams": 0}, "max_ngrams"),
        ({"ngram_distribution": "uniform"}, "ngram_distribution"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MaskingConfig(**kw)


def test_bad_vocabulary_inputs():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Masker(MaskingConfig(), 10, 3, [0, 1, 2, 99])
    with pytest.raises(ValueError, match="continuation mask has shape"):
        Masker(MaskingConfig(), 10, 3, [0, 1, 2], np.zeros(11, dtype=bool))
