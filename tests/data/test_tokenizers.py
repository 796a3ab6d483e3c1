"""Tokenizers against references on real data: GPT-2 ids from an independent pure-Python BPE written
here from merges.txt, BERT ids from the HF tokenizer.json shipped with the vocabulary; round trips,
special ids, batch == single, pickling, and the error messages for bad flags and files."""
from __future__ import annotations

import json
import pickle
import unicodedata
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from megapre.data.tokenizers import TOKENIZER_TYPES, TokenizerConfig, TokenizerError, build_tokenizer

DATA = SHARED_DATA
GPT2 = DATA / "gpt2"
BERT = DATA / "bert"
WIKI = DATA / "wikitext-2" / "valid.txt"
SHAKESPEARE = DATA / "tinyshakespeare.txt"

TRICKY = [
    "Hello world",
    "",
    " ",
    "  two  spaces   and\ttabs\n\nnewlines\r\n",
    "It's they'll we've I'm you'd ISN'T",
    "Numbers 1234567 3.14159 and 1,000,000",
    "Ünïcödé façade naïve — “quotes” … 日本語のテキスト 中文 한국어",
    "emoji 👍🏽🎉 and math ∑∫√",
    "<|endoftext|> is plain text here",
    "trailing space ",
    "a" * 300,
]


def need(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"test data {p} is absent (see ../shared/data/SOURCES.md)")


def wiki_lines(n: int) -> list[str]:
    need(WIKI)
    lines = [l for l in WIKI.read_text(encoding="utf-8").split("\n") if l.strip()]
    return lines[:n]


def build_gpt2(engine: str = "default"):
    """GPT-2 on a chosen engine: "tokenizers" hides tiktoken, as on a machine without it."""
    need(GPT2 / "vocab.json", GPT2 / "merges.txt")
    config = TokenizerConfig("GPT2BPETokenizer", str(GPT2 / "vocab.json"), str(GPT2 / "merges.txt"))
    if engine == "tiktoken":
        pytest.importorskip("tiktoken", reason="tiktoken is not installed (the tokenizers engine is tested)")
    with pytest.MonkeyPatch.context() as mp:
        if engine == "tokenizers":
            mp.setattr("megapre.data.tokenizer.gpt2.tiktoken", None)
        tok = build_tokenizer(config)
    assert engine == "default" or tok.engine == engine
    return tok


@pytest.fixture(scope="module", params=["tiktoken", "tokenizers"])
def gpt2(request):
    return build_gpt2(request.param)


@pytest.fixture(scope="module")
def bert_lower():
    need(BERT / "vocab.txt")
    return build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file=str(BERT / "vocab.txt")))


# ------------------------------------------------------------------ independent GPT-2 reference
class ReferenceGPT2:
    """GPT-2's published algorithm, written from scratch: regex pre-split, bytes -> printable
    characters, then repeatedly merge the adjacent pair with the lowest merge rank."""

    SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_path: Path, merges_path: Path):
        regex = pytest.importorskip("regex", reason="the reference GPT-2 split needs the `regex` package")
        self.pattern = regex.compile(self.SPLIT)
        self.vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")
        pairs = [tuple(l.split(" ")) for l in lines if l and not l.startswith("#version")]
        self.rank = {p: r for r, p in enumerate(pairs)}
        printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
        shifted = iter(range(256, 512))
        self.byte_char = {b: chr(b if b in printable else next(shifted)) for b in range(256)}
        self.cache: dict[str, list[int]] = {}

    def word(self, chunk: str) -> list[int]:
        if chunk in self.cache:
            return self.cache[chunk]
        parts = [self.byte_char[b] for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            ranked = [(self.rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, _ = min(ranked)
            if best == 1 << 30:
                break
            pair = next((a, b) for (r, _), a, b in zip(ranked, parts, parts[1:]) if r == best)
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.vocab[p] for p in parts]
        self.cache[chunk] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for chunk in self.pattern.findall(text) for i in self.word(chunk)]


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello world") == [18435, 995]
    assert gpt2.eod == 50256 and gpt2.vocab_size == 50257
    assert gpt2.bos is None and gpt2.cls is None  # no BOS is ever added
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_matches_independent_reference(gpt2):
    ref = ReferenceGPT2(GPT2 / "vocab.json", GPT2 / "merges.txt")
    texts = TRICKY + wiki_lines(300)
    ours = gpt2.encode_batch(texts)
    assert len(ours) == len(texts)
    for text, ids in zip(texts, ours):
        assert ids == ref.encode(text), text[:80]
        assert gpt2.decode(ids) == text
    # "<|endoftext|>" in text is text, not the eod id (as GPT-2 and Megatron).
    assert 50256 not in gpt2.encode("<|endoftext|>")


def test_gpt2_matches_reference_on_random_unicode(gpt2):
    """Seeded random strings over the characters where regex engines disagree most (unicode
    spaces, separators, combining marks, contractions)."""
    import random

    ref = ReferenceGPT2(GPT2 / "vocab.json", GPT2 / "merges.txt")
    rng = random.Random(1234)
    alphabet = list("abcXYZ019 '’.,!?-_\t\n\r") + [
        "'s", "'ll", " 's", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\x1c", "\x1f", "\x85",
        "é", "e\u0301", "日", "👍", "\u200b", "٣", "²", "ⅷ", "\ufeff", "\x00",
    ]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(1000)]
    assert gpt2.encode_batch(texts) == [ref.encode(t) for t in texts]


def test_gpt2_engines_agree_on_a_book():
    need(DATA / "gutenberg" / "gutenberg_en_24MiB.txt")
    with open(DATA / "gutenberg" / "gutenberg_en_24MiB.txt", encoding="utf-8") as f:
        text = f.read(400_000)
    docs = [text[i:i + 4000] for i in range(0, len(text), 4000)]
    fast, general = build_gpt2("tiktoken"), build_gpt2("tokenizers")
    assert fast.encode_batch(docs) == general.encode_batch(docs)
    assert fast.describe()["engine"] == "tiktoken" and fast.fingerprint() == general.fingerprint()


def test_gpt2_other_vocabularies_use_the_merge_list_engine(tmp_path):
    pytest.importorskip("tiktoken")
    need(GPT2 / "merges.txt", GPT2 / "vocab.json")
    lines = (GPT2 / "merges.txt").read_text(encoding="utf-8").split("\n")
    (tmp_path / "merges.txt").write_text("\n".join(lines[:-2]) + "\n", encoding="utf-8")  # one merge fewer
    tok = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(GPT2 / "vocab.json"), str(tmp_path / "merges.txt")))
    assert tok.engine == "tokenizers"
    # A re-formatted copy of GPT-2's own files is recognised by content and keeps the fast engine.
    vocab = json.loads((GPT2 / "vocab.json").read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, indent=1), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(lines[1:]), encoding="utf-8")  # no #version line
    copy = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    assert copy.engine == "tiktoken" and copy.encode("Hello world") == [15496, 995]


def test_gpt2_decodes_split_utf8_with_replacement(gpt2):
    ids = gpt2.encode("日本")
    assert len(ids) > 1
    assert "\ufffd" in gpt2.decode(ids[:1])


# ----------------------------------------------------------------------------------------- BERT
class ReferenceBert:
    """BERT's published tokenization, written from scratch: clean, space out CJK, split on whitespace,
    (lower-case and strip accents), split off punctuation, then greedy longest-match WordPiece."""

    CJK = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
           (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]

    def __init__(self, vocab_path: Path, lower: bool):
        lines = vocab_path.read_text(encoding="utf-8").split("\n")
        self.vocab = {t.strip(): i for i, t in enumerate(lines[:-1] if lines[-1] == "" else lines)}
        self.lower = lower

    @staticmethod
    def punct(ch: str) -> bool:
        cp = ord(ch)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
            unicodedata.category(ch).startswith("P")

    def words(self, text: str) -> list[str]:
        out = []
        for ch in text:
            cp, cat = ord(ch), unicodedata.category(ch)
            if cp in (0, 0xFFFD) or (ch not in "\t\n\r" and cat.startswith("C")):
                continue
            if ch in " \t\n\r" or cat == "Zs":
                out.append(" ")
            elif any(lo <= cp <= hi for lo, hi in self.CJK):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        words = []
        for word in "".join(out).split():
            if self.lower:
                word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            current = ""
            for ch in word:
                if self.punct(ch):
                    words += [current, ch] if current else [ch]
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.vocab["[UNK]"]]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.vocab["[UNK]"]]
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for w in self.words(text) for i in self.wordpiece(w)]


def test_bert_lower_matches_independent_reference(bert_lower):
    ref = ReferenceBert(BERT / "vocab.txt", lower=True)
    texts = TRICKY + wiki_lines(300) + ["Ａｃｃｅｎｔｓ àéîõü ÀÉÎÕÜ\u0000ctrl\u200bzw ﬁ ǅ", "x" * 101 + " ok"]
    ours = bert_lower.encode_batch(texts)
    assert len(ours) == len(texts)
    for text, ids in zip(texts, ours):
        assert ids == ref.encode(text), text[:80]


def test_bert_lower_matches_tokenizer_json(bert_lower):
    need(BERT / "tokenizer.json")
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(BERT / "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    texts = [t for t in TRICKY if "<|" not in t] + wiki_lines(300)
    long_doc = " ".join(wiki_lines(200))  # longer than the reference's 512-token truncation
    texts.append(long_doc)
    ours = bert_lower.encode_batch(texts)
    assert len(ours) == len(texts)
    for text, ids in zip(texts, ours):
        assert ids == ref.encode(text, add_special_tokens=False).ids, text[:80]
        assert ids == bert_lower.encode(text)
    assert len(ours[-1]) > 2000


def test_bert_special_ids_and_megatron_extras(bert_lower):
    vocab = (BERT / "vocab.txt").read_text(encoding="utf-8").split("\n")
    for name, token in [("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("mask", "[MASK]"), ("unk", "[UNK]")]:
        assert getattr(bert_lower, name) == vocab.index(token)
    n = len([l for l in vocab if l != ""])
    # As Megatron: [BOS] and [EOS] appended; eod is [EOS].
    assert bert_lower.vocab_size == n + 2
    assert (bert_lower.bos, bert_lower.eod) == (n, n + 1)
    assert bert_lower.decode([bert_lower.cls]) == "[CLS]"
    # "[SEP]" typed in text is punctuation and letters, not the separator (as original BERT).
    assert bert_lower.sep not in bert_lower.encode("a [SEP] b")


def test_bert_continuation_mask_and_decode(bert_lower):
    mask = bert_lower.continuation_mask()
    assert mask.dtype == bool and mask.shape == (bert_lower.vocab_size,)
    ids = bert_lower.encode("unaffable tokenization")
    pieces = [bert_lower.decode([i]) for i in ids]
    assert [p.startswith("##") for p in pieces] == [bool(mask[i]) for i in ids]
    assert mask[ids].any() and not mask[ids].all()
    assert bert_lower.decode(ids) == "unaffable tokenization"
    assert bert_lower.decode(bert_lower.encode("Hello, World!")) == "hello, world!"


def test_bert_cased_keeps_case():
    need(BERT / "vocab.txt")
    cased = build_tokenizer(TokenizerConfig("BertWordPieceCase", vocab_file=str(BERT / "vocab.txt")))
    ref = ReferenceBert(BERT / "vocab.txt", lower=False)
    texts = ["Hello World", "naïve Café"] + TRICKY + wiki_lines(100)
    assert cased.encode_batch(texts) == [ref.encode(t) for t in texts]
    # The vocabulary is uncased: "Hello" is not a whole word in it, "hello" is.
    assert cased.encode("Hello") != cased.encode("hello")


# ------------------------------------------------------------------------------- tokenizer.json
def test_huggingface_tokenizer_dir_and_file(tmp_path):
    need(BERT / "tokenizer.json")
    by_dir = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(BERT)))
    shutil.copy(BERT / "tokenizer.json", tmp_path / "tokenizer.json")
    by_file = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json")))
    text = " ".join(wiki_lines(100))
    ids = by_dir.encode(text)
    assert len(ids) > 512  # the file's padding/truncation settings are switched off
    assert ids == by_file.encode(text) == by_dir.encode_batch([text])[0]
    assert (by_dir.cls, by_dir.sep, by_dir.pad, by_dir.mask) == (101, 102, 0, 103)
    assert by_dir.eod is None and by_dir.vocab_size == 30522
    assert by_dir.continuation_mask().sum() > 1000
    names = set(by_dir.describe()["files"])
    assert "tokenizer_model" in names and any("tokenizer_config.json" in n for n in names)


def test_huggingface_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(tmp_path)))
    with pytest.raises(TokenizerError, match="Hub are not supported"):
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model="gpt2/does-not-exist"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(bad)))


# ------------------------------------------------------------------------- shared behaviour
def test_pickle_round_trip_and_file_change_detected(tmp_path, gpt2):
    clone = pickle.loads(pickle.dumps(gpt2))
    assert clone.encode_batch(TRICKY) == gpt2.encode_batch(TRICKY)
    assert clone.fingerprint() == gpt2.fingerprint() and clone.describe()["files"] == gpt2.describe()["files"]
    vocab = tmp_path / "vocab.json"
    shutil.copy(GPT2 / "vocab.json", vocab)
    tok = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(vocab), str(GPT2 / "merges.txt")))
    blob = pickle.dumps(tok)
    with open(vocab, "a", encoding="utf-8") as f:
        f.write("\n")  # same vocabulary, different bytes: still refused
    with pytest.raises(TokenizerError, match="changed since"):
        pickle.loads(blob)


def test_pickle_from_relative_paths_in_another_directory(tmp_path, monkeypatch):
    need(BERT / "vocab.txt")
    shutil.copy(BERT / "vocab.txt", tmp_path / "vocab.txt")
    monkeypatch.chdir(tmp_path)
    tok = build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file="vocab.txt"))
    blob = pickle.dumps(tok)
    monkeypatch.chdir(tmp_path.parent)
    assert pickle.loads(blob).encode("hello world") == tok.encode("hello world")


def test_fingerprint_ignores_location(tmp_path, gpt2):
    shutil.copy(GPT2 / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(GPT2 / "merges.txt", tmp_path / "merges.txt")
    moved = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    assert moved.fingerprint() == gpt2.fingerprint() == gpt2.describe()["fingerprint"]
    other = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=50256))
    assert other.fingerprint() != build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=50257)).fingerprint()


def test_describe_has_file_hashes(gpt2):
    import hashlib

    desc = gpt2.describe()
    assert desc["type"] == "GPT2BPETokenizer" and desc["vocab_size"] == 50257
    assert desc["special_ids"]["eod"] == 50256
    digest = hashlib.sha256((GPT2 / "merges.txt").read_bytes()).hexdigest()
    assert desc["files"]["merge_file"]["sha256"] == digest
    json.dumps(desc)  # goes into stats files as JSON


def test_decode_rejects_ids_outside_vocab(gpt2, bert_lower):
    for tok in (gpt2, bert_lower):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([tok.vocab_size])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([-1])
    assert gpt2.decode(np.array([15496, 995], dtype=np.uint16)) == "Hello world"


# ------------------------------------------------------------------------------------ errors
def test_unknown_type_lists_valid_names():
    with pytest.raises(TokenizerError) as err:
        build_tokenizer(TokenizerConfig("GPT2BPE"))
    msg = str(err.value)
    assert all(name in msg for name in TOKENIZER_TYPES) and "did you mean GPT2BPETokenizer" in msg


def test_missing_flags_and_files_name_the_fix(tmp_path):
    need(GPT2 / "vocab.json")
    cases = [
        (TokenizerConfig("GPT2BPETokenizer", vocab_file=str(GPT2 / "vocab.json")), "needs --merge-file"),
        (TokenizerConfig("GPT2BPETokenizer", merge_file=str(GPT2 / "merges.txt")), "needs --vocab-file"),
        (TokenizerConfig("GPT2BPETokenizer", str(tmp_path / "nope.json"), str(GPT2 / "merges.txt")), "nope.json: no such file"),
        (TokenizerConfig("GPT2BPETokenizer", str(tmp_path), str(GPT2 / "merges.txt")), "is a directory"),
        (TokenizerConfig("GPT2BPETokenizer", str(GPT2 / "merges.txt"), str(GPT2 / "vocab.json")), "--vocab-file .*not valid JSON"),
        (TokenizerConfig("BertWordPieceLowerCase"), "needs --vocab-file"),
        (TokenizerConfig("BertWordPieceLowerCase", vocab_file=str(GPT2 / "merges.txt")), "missing the BERT special tokens"),
        (TokenizerConfig("BertWordPieceCase", vocab_file=str(BERT / "vocab.txt"), merge_file=str(GPT2 / "merges.txt")), "does not use --merge-file"),
        (TokenizerConfig("SentencePieceTokenizer"), "needs --tokenizer-model"),
        (TokenizerConfig("SentencePieceTokenizer", tokenizer_model=str(GPT2 / "vocab.json")), "not a SentencePiece model"),
        (TokenizerConfig("NullTokenizer"), "needs --vocab-size"),
        (TokenizerConfig("CharacterTokenizer", vocab_file=str(GPT2 / "vocab.json")), "not a character vocabulary"),
    ]
    for config, pattern in cases:
        with pytest.raises(TokenizerError, match=pattern):
            build_tokenizer(config)


def test_binary_or_empty_vocab_files(tmp_path):
    binary = tmp_path / "vocab.txt"
    binary.write_bytes(b"\xff\xfe\x00[CLS]\x00")
    with pytest.raises(TokenizerError, match="vocab.txt: not UTF-8 text"):
        build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file=str(binary)))
    empty = tmp_path / "vocab.json"
    empty.write_text("{}")
    with pytest.raises(TokenizerError, match="vocabulary is empty"):
        build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(empty), str(empty)))
    no_eod = tmp_path / "small.json"
    no_eod.write_text('{"a": 0, "b": 1}')
    with pytest.raises(TokenizerError, match="no <\\|endoftext\\|> token"):
        build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(no_eod), str(empty)))


def test_mismatched_merge_file(tmp_path):
    need(GPT2 / "vocab.json")
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\nĠ t\nzzzq qqqz\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"merges.txt:3: merge token 'zzzq' is not in the vocabulary"):
        build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(GPT2 / "vocab.json"), str(merges)))
    merges.write_text("#version: 0.2\nĠ t x\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"merges.txt:2: expected two space-separated tokens"):
        build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(GPT2 / "vocab.json"), str(merges)))


# ---------------------------------------------------------------------------------- SentencePiece
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    need(SHAKESPEARE)
    spm = pytest.importorskip("sentencepiece")
    lines = [l for l in SHAKESPEARE.read_text(encoding="utf-8").split("\n") if l.strip()][:4000]
    path = tmp_path_factory.mktemp("spm") / "shakespeare.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=400,
                                       minloglevel=2, num_threads=1)
    return path


def test_sentencepiece_megatron_flavour(sp_model):
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", tokenizer_model=str(sp_model)))
    n = proc.get_piece_size()
    # As Megatron: <CLS> <SEP> <EOD> <MASK> appended, then <PAD> (the model has no pad piece).
    assert (tok.cls, tok.sep, tok.eod, tok.mask, tok.pad) == (n, n + 1, n + 2, n + 3, n + 4)
    assert tok.vocab_size == n + 5 and tok.bos == proc.bos_id() and tok.eos == proc.eos_id()
    text = "First Citizen: Before we proceed any further, hear me speak."
    assert tok.encode(text) == proc.encode(text)
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("hear me<SEP>speak<EOD>")
    assert ids == proc.encode("hear me") + [tok.sep] + proc.encode("speak") + [tok.eod]
    assert tok.decode(ids) == "hear me <SEP> speak <EOD> "
    texts = [text, "no specials", "a<MASK>b", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert not tok.continuation_mask().any()
    assert pickle.loads(pickle.dumps(tok)).encode(texts[2]) == tok.encode(texts[2])


def test_gpt_sentencepiece_uses_model_eos(sp_model):
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = build_tokenizer(TokenizerConfig("GPTSentencePieceTokenizer", tokenizer_model=str(sp_model)))
    assert tok.vocab_size == proc.get_piece_size()
    assert (tok.eod, tok.bos, tok.pad) == (proc.eos_id(), proc.bos_id(), None)
    lines = [l for l in SHAKESPEARE.read_text(encoding="utf-8").split("\n") if l.strip()][:200]
    assert tok.encode_batch(lines) == [proc.encode(l) for l in lines]
    batch = tok.encode_batch(lines)
    assert [tok.decode(ids) for ids in batch] == [proc.decode(ids) for ids in batch]
    kept = [l for l, ids in zip(lines, batch) if proc.unk_id() not in ids]  # rare letters fall out of a small model
    assert len(kept) > 150 and all(tok.decode(tok.encode(l)) == l for l in kept)


# ------------------------------------------------------------------------------------ byte-level
def test_byte_level():
    tok = build_tokenizer(TokenizerConfig("ByteLevelTokenizer"))
    assert (tok.vocab_size, tok.eod, tok.pad) == (258, 256, 257)
    for text in TRICKY:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.decode([104, 105, 256]) == "hi<|endoftext|>"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte character
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    with pytest.raises(ValueError, match="not encodable as UTF-8"):
        tok.encode("lone \ud800 surrogate")
    with pytest.raises(TokenizerError, match="does not use --vocab-file"):
        build_tokenizer(TokenizerConfig("ByteLevelTokenizer", vocab_file="x"))
    assert pickle.loads(pickle.dumps(tok)).encode("abc") == [97, 98, 99]


# ------------------------------------------------------------------------------------ characters
def test_character_tinyshakespeare(tmp_path):
    """nanoGPT's shakespeare-char setting: 65 characters, 1,003,854 train tokens in the 90% split."""
    need(SHAKESPEARE)
    from megapre.data.tokenizers import write_char_vocab

    text = SHAKESPEARE.read_text(encoding="utf-8")
    vocab = write_char_vocab(tmp_path / "chars.json", text)
    tok = build_tokenizer(TokenizerConfig("CharacterTokenizer", vocab_file=str(vocab)))
    assert tok.vocab_size == 65 and tok.eod is None
    ids = tok.encode(text)
    assert len(ids[: int(0.9 * len(ids))]) == 1_003_854
    assert ids[:3] == [sorted(set(text)).index(c) for c in "Fir"]
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match=r"character 'é' \(U\+00E9, offset 2\) is not in the vocabulary"):
        tok.encode("caé")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("Hello") == tok.encode("Hello")


def test_character_specials(tmp_path):
    from megapre.data.tokenizers import write_char_vocab

    vocab = write_char_vocab(tmp_path / "chars.json", "abc", specials=("eod", "unk"))
    tok = build_tokenizer(TokenizerConfig("CharacterTokenizer", vocab_file=str(vocab)))
    assert (tok.vocab_size, tok.eod, tok.unk, tok.pad) == (5, 3, 4, None)
    assert tok.encode("abzc") == [0, 1, 4, 2]
    assert tok.decode([0, 3]) == "a<|endoftext|>"
    with pytest.raises(ValueError, match="unknown special tokens"):
        write_char_vocab(tmp_path / "x.json", "abc", specials=("bos",))


# ------------------------------------------------------------------------------------------ null
def test_null_tokenizer_as_megatron():
    tok = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=1000))
    assert (tok.vocab_size, tok.eod) == (1001, 1000)  # Megatron: eod = --vocab-size, vocab + 1
    assert tok.encode("5 17\n999  0") == [5, 17, 999, 0]
    assert tok.encode_batch(["1 2", ""]) == [[1, 2], []]
    assert tok.decode([5, 17, 1000]) == "5 17 1000"
    with pytest.raises(ValueError, match="'x7' is not an integer"):
        tok.encode("1 x7 3")
    with pytest.raises(ValueError, match="id 1001 is outside"):
        tok.encode("1 1001")
    with pytest.raises(TokenizerError, match="--vocab-size N > 0"):
        build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=0))
    assert pickle.loads(pickle.dumps(tok)).eod == 1000


def test_megatron_flags_round_trip_through_argparse():
    import argparse

    from megapre.cli.tokenizer_flags import add_tokenizer_flags as add_tokenizer_args, tokenizer_config_from_args

    parser = argparse.ArgumentParser()
    add_tokenizer_args(parser)
    args = parser.parse_args(["--tokenizer-type", "NullTokenizer", "--vocab-size", "128"])
    config = tokenizer_config_from_args(args)
    assert config == TokenizerConfig("NullTokenizer", vocab_size=128)
    assert build_tokenizer(config).eod == 128
    with pytest.raises(SystemExit):
        parser.parse_args(["--vocab-size", "5"])  # --tokenizer-type is required


@pytest.mark.slow
def test_tokenizers_work_in_spawned_workers(bert_lower):
    """What preprocessing does: ship tokenizers to fresh processes, encode there."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    gpt2 = build_gpt2()

    texts = TRICKY + wiki_lines(50)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        remote = [pool.submit(tok.encode_batch, texts) for tok in (gpt2, bert_lower)]
        assert remote[0].result(timeout=120) == gpt2.encode_batch(texts)
        assert remote[1].result(timeout=120) == bert_lower.encode_batch(texts)
