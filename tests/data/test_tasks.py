"""Labelled task files: TSV/CSV/JSONL reading (header and column-number keys, counted empty rows, one
error per bad input naming file:line), label sets (order, regression, unknown labels), BERT/GPT
encodings with longest-first truncation, and the real SST-2 / AG News files."""
from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest

from conftest import SHARED_DATA
from megapre.data.errors import DataError
from megapre.data.tasks import (
    EncodedTask,
    LabelSet,
    TaskColumns,
    TaskExample,
    encode_examples,
    longest_first,
    read_task_file,
    read_task_files,
)
from megapre.errors import ConfigError

SST2, AGNEWS = SHARED_DATA / "sst2", SHARED_DATA / "agnews"
POSITIONS = TaskColumns(text_key="0", label_key="1")


class WordTokenizer:
    """One id per whitespace word (ids from 10 on, first come first served); specials as BERT/GPT have."""

    name = "words"

    def __init__(self, cls: int | None = 1, sep: int | None = 2, eod: int | None = 3) -> None:
        self.cls, self.sep, self.pad, self.eod = cls, sep, 0, eod
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def examples(*labels: str) -> list[TaskExample]:
    return [TaskExample(f"text {i}", None, label, f"t.tsv:{i + 2}") for i, label in enumerate(labels)]


# ------------------------------------------------------------------------------------------ reading
def test_tsv_with_header_keeps_quotes_and_counts_empty_rows(tmp_path):
    path = write(tmp_path, "a.tsv", 'sentence\tlabel\r\nit \'s "great" \t1\r\n   \t0\n\nbad , "quote\t0\n')
    result = read_task_file(path, TaskColumns())
    assert [(e.text, e.label, e.pair) for e in result.examples] == [('it \'s "great" ', "1", None),
                                                                     ('bad , "quote', "0", None)]
    assert [e.source for e in result.examples] == [f"{path}:2", f"{path}:5"]
    assert result.skipped_empty == 2  # whitespace text on line 3, blank line 4


def test_header_names_select_columns_in_any_order(tmp_path):
    path = write(tmp_path, "p.tsv", "id\tlabel\tq\tp\n7\tyes\tfirst\tsecond\n")
    ex = read_task_file(path, TaskColumns(text_key="q", text_pair_key="p", label_key="label")).examples[0]
    assert (ex.text, ex.pair, ex.label) == ("first", "second", "yes")


def test_column_numbers_mean_no_header(tmp_path):
    path = write(tmp_path, "ag.tsv", "Stocks fall\tBusiness\nTeam wins\tSports\n")
    result = read_task_file(path, POSITIONS)
    assert [(e.text, e.label, e.source) for e in result.examples] == [
        ("Stocks fall", "Business", f"{path}:1"), ("Team wins", "Sports", f"{path}:2")]
    flipped = read_task_file(path, TaskColumns(text_key="1", label_key="0")).examples
    assert flipped[0].text == "Business" and flipped[0].label == "Stocks fall"


def test_csv_quoting_and_multiline_rows_report_their_first_line(tmp_path):
    path = write(tmp_path, "a.csv", 'text,label\n"a, b ""c""",pos\n"two\nlines",neg\nplain,pos\n')
    result = read_task_file(path, TaskColumns(text_key="text"))
    assert [(e.text, e.label) for e in result.examples] == [('a, b "c"', "pos"), ("two\nlines", "neg"),
                                                            ("plain", "pos")]
    assert [e.source.rsplit(":", 1)[1] for e in result.examples] == ["2", "3", "5"]


def test_jsonl_labels_as_written_and_null_text_skipped(tmp_path):
    rows = [{"s": "good", "label": 1}, {"s": None, "label": 0}, {"s": "bad", "label": "neg"},
            {"s": "meh", "label": 0.5}, {"s": 3, "label": True}]
    path = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    result = read_task_file(path, TaskColumns(text_key="s"))
    assert [(e.text, e.label) for e in result.examples] == [("good", "1"), ("bad", "neg"), ("meh", "0.5"),
                                                            ("3", "true")]
    assert result.skipped_empty == 2 and result.examples[1].source == f"{path}:3"


def test_gzip_and_json_extension(tmp_path):
    path = tmp_path / "a.tsv.gz"
    path.write_bytes(gzip.compress(b"sentence\tlabel\nhello\t1\n"))
    assert read_task_file(path, TaskColumns()).examples[0].text == "hello"
    path = write(tmp_path, "b.json", '{"sentence": "x", "label": "y"}\n')
    assert read_task_file(path, TaskColumns()).examples[0].label == "y"


def test_several_files_concatenate_in_order(tmp_path):
    a = write(tmp_path, "a.tsv", "sentence\tlabel\none\t0\n\t1\n")
    b = write(tmp_path, "b.jsonl", '{"sentence": "two", "label": 1}\n')
    result = read_task_files([a, b], TaskColumns())
    assert [e.text for e in result.examples] == ["one", "two"] and result.skipped_empty == 1


@pytest.mark.parametrize("name,content,columns,match", [
    ("a.txt", "x\t1\n", TaskColumns(), r"a.txt: unknown task file type '.txt'; name it .tsv, .csv or .jsonl"),
    ("a", "x\t1\n", TaskColumns(), r"unknown task file type '\(no extension\)'"),
    ("a.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", label: 1}\n', TaskColumns(),
     r"a.jsonl:2: not JSON \(Expecting property name enclosed in double quotes, column 19\)"),
    ("a.jsonl", '{"sentence": "a", "label": 1}\n\n["b", 1]\n', TaskColumns(),
     r"a.jsonl:3: a JSON list, expected an object with keys \['sentence', 'label'\]"),
    ("a.json", '[{"sentence": "a", "label": 1}]', TaskColumns(), r"a.json: a JSON array; write one JSON object"),
    ("a.jsonl", '{"text": "a", "label": 1}\n', TaskColumns(),
     r"a.jsonl:1: no key 'sentence' \(--text-key\); the object has keys \['text', 'label'\]"),
    ("a.tsv", "text\tlabel\na\t1\n", TaskColumns(),
     r"a.tsv:1: no column 'sentence' \(--text-key\); the header row has columns \['text', 'label'\]"),
    ("a.csv", "sentence,y\na,1\n", TaskColumns(),
     r"a.csv:1: no column 'label' \(--label-key\); the header row has columns \['sentence', 'y'\]"),
    ("a.tsv", "sentence\tlabel\na\t1\nb\tc\t1\n", TaskColumns(),
     r"a.tsv:3: 3 tab-separated fields, expected 2 like the rows before; TSV has no quoting"),
    ("a.tsv", "a\t1\nb\n", POSITIONS, r"a.tsv:2: 1 tab-separated fields, expected 2"),
    ("a.csv", 'sentence,label\n"a"b,1\n', TaskColumns(), r"a.csv:2: not valid CSV"),
    ("a.tsv", "a\t1\n", TaskColumns(text_key="0", label_key="2"),
     r"a.tsv:1: --label-key 2 selects column 2 but rows have 2 tab-separated fields"),
    ("a.tsv", "sentence\tlabel\na\t\n", TaskColumns(), r"a.tsv:2: no label in column 'label' \(--label-key\)"),
    ("a.jsonl", '{"sentence": "a", "label": null}\n', TaskColumns(), r"a.jsonl:1: no label in column 'label'"),
    ("a.tsv", "", TaskColumns(), r"a.tsv: no examples \(empty file\)"),
    ("a.tsv", "sentence\tlabel\n", TaskColumns(), r"a.tsv: no examples; expected rows"),
    ("a.tsv", "sentence\tlabel\n \t1\n", TaskColumns(), r"a.tsv: no examples \(1 rows with empty text skipped\)"),
    ("a.tsv", b"sentence\tlabel\nok\t1\ncaf\xe9\t1\n", TaskColumns(), r"a.tsv:3: not UTF-8 text \(byte 0xe9\)"),
    ("a.tsv", b"sentence\tlabel\n\x00\x01\x02\x03", TaskColumns(), r"a.tsv:2: binary content \(a NUL byte\)"),
    ("a.tsv.gz", b"sentence\tlabel\n", TaskColumns(), r"a.tsv.gz: not a complete gzip file"),
])
def test_bad_files_are_one_data_error_naming_file_and_line(tmp_path, name, content, columns, match):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=match):
        read_task_file(path, columns)


def test_missing_file_and_mixed_keys(tmp_path):
    with pytest.raises(DataError, match=r"nope.tsv: no such file"):
        read_task_file(tmp_path / "nope.tsv", TaskColumns())
    with pytest.raises(DataError, match=r"is a directory"):
        read_task_file(tmp_path, TaskColumns())
    path = write(tmp_path, "a.tsv", "a\t1\n")
    with pytest.raises(ConfigError, match=r"--text-key 0, --label-key label: column numbers and column names"):
        read_task_file(path, TaskColumns(text_key="0"))
    with pytest.raises(DataError, match="no task files given"):
        read_task_files([], TaskColumns())


# ------------------------------------------------------------------------------------------- labels
def test_labels_sorted_numerically_when_integers_else_as_strings():
    assert LabelSet.build(examples("10", "2", "1", "2"), None, None).names == ("1", "2", "10")
    assert LabelSet.build(examples("b", "10", "a", "2"), None, None).names == ("10", "2", "a", "b")
    labels = LabelSet.build(examples("neg", "pos"), ["pos", "neg"], 2)
    assert labels.names == ("pos", "neg") and labels.num_classes == 2
    assert [labels.encode(e) for e in examples("neg", "pos")] == [1, 0]
    assert LabelSet.from_dict(json.loads(json.dumps(labels.to_dict()))) == labels


def test_label_errors():
    with pytest.raises(DataError, match=r"label 'maybe' at t.tsv:3 is not in --label-names \['yes', 'no'\]"):
        LabelSet.build(examples("yes", "maybe"), ["yes", "no"], None)
    with pytest.raises(ConfigError, match=r"--num-classes 3 but the labels are \['0', '1'\]"):
        LabelSet.build(examples("0", "1"), None, 3)
    with pytest.raises(ConfigError, match=r"--label-names .*distinct"):
        LabelSet.build(examples("a", "b"), ["a", "a"], None)
    with pytest.raises(DataError, match=r"a single label '1' .*nothing to learn"):
        LabelSet.build(examples("1", "1"), None, None)
    with pytest.raises(DataError, match=r"single label"):
        LabelSet.build(examples("1", "1"), ["0", "1"], None)
    with pytest.raises(ConfigError, match=r"--num-classes 0"):
        LabelSet.build(examples("0", "1"), None, 0)
    with pytest.raises(ConfigError, match=r"label set"):
        LabelSet.from_dict({"names": ["a"], "regression": True})


def test_unknown_label_in_an_evaluation_file(tmp_path):
    labels = LabelSet.build(examples("0", "1"), None, None)
    dev = read_task_file(write(tmp_path, "dev.tsv", "sentence\tlabel\nfine\t1\nodd\t3\n"), TaskColumns())
    with pytest.raises(DataError, match=r"label '3' at .*dev.tsv:3 is not one of the training labels"):
        encode_examples(dev.examples, labels, WordTokenizer(), "bert", 8)
    bad = TaskExample("x", None, "2", "dev.tsv:7")
    with pytest.raises(DataError, match=r"label '2' at dev.tsv:7 is not one of the training labels "
                                        r"\['0', '1'\]; pass --label-names"):
        labels.encode(bad)
    with pytest.raises(DataError, match=r"dev.tsv:7"):
        encode_examples([bad], labels, WordTokenizer(), "bert", 8)


def test_regression_labels():
    labels = LabelSet.build(examples("0.5", "3", "-1e-2"), None, 1)
    assert labels.regression and labels.names == () and labels.num_classes == 1
    assert labels.encode(examples("2.25")[0]) == 2.25
    assert LabelSet.from_dict(labels.to_dict()) == labels
    with pytest.raises(DataError, match=r"label 'high' at t.tsv:3 is not a finite number.*--num-classes 1"):
        LabelSet.build(examples("1", "high"), None, 1)
    with pytest.raises(DataError, match=r"label 'nan' at t.tsv:2 is not a finite number"):
        labels.encode(examples("nan")[0])
    with pytest.raises(ConfigError, match=r"--label-names with --num-classes 1"):
        LabelSet.build(examples("1", "2"), ["1", "2"], 1)
    enc = encode_examples(examples("1.5", "2"), labels, WordTokenizer(), "gpt", 8)
    assert enc.labels.dtype == np.float32 and enc.labels.tolist() == [1.5, 2.0]


# ----------------------------------------------------------------------------------------- encoding
def test_longest_first_matches_one_token_at_a_time():
    def naive(la, lb, budget):
        while la + lb > budget:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        return la, lb

    for la in range(12):
        for lb in range(12):
            for budget in range(0, 25):
                assert longest_first(la, lb, budget) == naive(la, lb, budget), (la, lb, budget)


def pair_example(a: str, b: str | None, label: str = "x") -> TaskExample:
    return TaskExample(a, b, label, "t:1")


def test_bert_single_and_pair_encoding_with_longest_first_truncation():
    tok, labels = WordTokenizer(), LabelSet(("x", "y"))
    data = [pair_example("a b c", None), pair_example("a b c d e f", "p q"), pair_example("a b", "p q r s t u", "y"),
            pair_example("a b c", "p q")]
    enc = encode_examples(data, labels, tok, "bert", 8)
    a, b, c, d, e, f = (tok.vocab[w] for w in "abcdef")
    p, q, r, s = (tok.vocab[w] for w in "pqrs")
    assert enc.tokens[0].tolist() == [1, a, b, c, 2] and enc.types[0].tolist() == [0] * 5
    assert enc.tokens[1].tolist() == [1, a, b, c, 2, p, q, 2]  # 6+2 > 5: the longer first loses 3
    assert enc.types[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert enc.tokens[2].tolist() == [1, a, b, 2, p, q, r, 2]
    assert enc.tokens[3].tolist() == [1, a, b, c, 2, p, q, 2]  # fits exactly: not truncated
    assert enc.truncated == 2 and enc.labels.tolist() == [0, 0, 1, 0] and enc.labels.dtype == np.int64
    assert enc.tokens[0].dtype == np.int32 and enc.lengths().tolist() == [5, 8, 8, 8] and len(enc) == 4
    assert enc.sources == ["t:1"] * 4
    long = encode_examples([pair_example("a b c d e f", None)], labels, tok, "bert", 4)
    assert long.tokens[0].tolist() == [1, a, b, 2] and long.truncated == 1


def test_gpt_encoding_keeps_the_beginning_and_ends_with_eod():
    tok, labels = WordTokenizer(cls=None, sep=None), LabelSet(("x", "y"))
    enc = encode_examples([pair_example("a b", None), pair_example("a b", "c d"), pair_example("a b c d e", None),
                           pair_example("a b", "c d e f")], labels, tok, "gpt", 5)
    a, b, c, d = (tok.vocab[w] for w in "abcd")
    assert enc.tokens[0].tolist() == [a, b, 3]
    assert enc.tokens[1].tolist() == [a, b, 3, c, 3]  # a [eod] b cut to 4, then the closing [eod]
    assert enc.tokens[2].tolist() == [a, b, c, d, 3] and enc.tokens[3].tolist() == [a, b, 3, c, 3]
    assert all(t.tolist() == [0] * len(t) for t in enc.types) and enc.truncated == 3


def test_encoding_config_errors():
    labels, ex = LabelSet(("x", "y")), [pair_example("a", None)]
    with pytest.raises(ConfigError, match=r"--seq-length 2: a BERT example needs at least 3 tokens"):
        encode_examples(ex, labels, WordTokenizer(), "bert", 2)
    with pytest.raises(ConfigError, match=r"--seq-length 1: a GPT example needs at least 2"):
        encode_examples(ex, labels, WordTokenizer(), "gpt", 1)
    with pytest.raises(ConfigError, match=r"tokenizer words has no cls/sep token"):
        encode_examples(ex, labels, WordTokenizer(cls=None, sep=None), "bert", 8)
    with pytest.raises(ConfigError, match=r"tokenizer words has no eod token"):
        encode_examples(ex, labels, WordTokenizer(eod=None), "gpt", 8)
    with pytest.raises(ConfigError, match=r"model kind 't5'"):
        encode_examples(ex, labels, WordTokenizer(), "t5", 8)


def bert_tokenizer():
    vocab = SHARED_DATA / "bert" / "vocab.txt"
    if not vocab.is_file():
        pytest.skip(f"BERT vocabulary {vocab} is absent")
    from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

    return build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file=str(vocab)))


def test_bert_wordpiece_ids_of_a_pair():
    tok = bert_tokenizer()
    enc = encode_examples([pair_example("The movie was great!", "I agree.")], LabelSet(("x", "y")), tok, "bert", 32)
    a, b = tok.encode("The movie was great!"), tok.encode("I agree.")
    assert enc.tokens[0].tolist() == [tok.cls, *a, tok.sep, *b, tok.sep]
    assert enc.types[0].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)


# -------------------------------------------------------------------------------------- real files
def need(path):
    if not path.is_file():
        pytest.skip(f"{path} is absent (shared test data)")
    return path


def test_sst2_files():
    train = read_task_file(need(SST2 / "train.tsv"), TaskColumns())
    assert len(train.examples) == 60_614 and train.skipped_empty == 0
    labels = LabelSet.build(train.examples, None, None)
    assert labels.names == ("0", "1")
    for name, rows in (("dev.tsv", 6_735), ("test.tsv", 872)):
        result = read_task_file(need(SST2 / name), TaskColumns())
        assert len(result.examples) == rows
        assert {labels.encode(e) for e in result.examples} == {0, 1}
    assert sum("'" in e.text for e in train.examples) > 10_000  # GLUE TSV: quotes are plain text


def test_agnews_files():
    train = read_task_file(need(AGNEWS / "train.tsv"), POSITIONS)
    test = read_task_file(need(AGNEWS / "test.tsv"), POSITIONS)
    assert (len(train.examples), len(test.examples)) == (10_001, 7_600)
    labels = LabelSet.build(train.examples, None, None)
    assert labels.names == ("Business", "Sci/Tech", "Sports", "World") and labels.num_classes == 4
    assert Counter(labels.encode(e) for e in test.examples) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    enc = encode_examples(test.examples[:200], labels, bert_tokenizer(), "bert", 32)
    assert isinstance(enc, EncodedTask) and enc.lengths().max() == 32 and enc.truncated > 0
