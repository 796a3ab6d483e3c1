"""Labelled task files (TSV, CSV, JSONL) for fine-tuning: read -> label ids -> token ids.

Three steps, each a pure function of its inputs so that every process of a run builds the same data:
`read_task_file` turns a file into `TaskExample`s (text, optional pair, label as written, and the
`path:line` it came from, for error messages and the predictions file); `LabelSet.build` fixes the
classes and their order from the training data (or `--label-names`) and is saved in the fine-tuned
checkpoint, so a validation or test file is encoded with the training classes; `encode_examples`
adds the model's special tokens (BERT: [CLS] a [SEP] b [SEP]; GPT: a [eod] b [eod]) and cuts what
does not fit `--seq-length`, counting it.

Column keys: an all-digit key ("0", "1") selects a TSV/CSV column by position and means the file has
no header row (AG News: text<TAB>label); a name means the first row is the header. In JSONL every key
is an object key. TSV is split on tabs with no quoting (GLUE style: texts contain '"'); CSV follows
RFC 4180 quoting (python's csv module). A row whose text (or pair) is empty is skipped and counted,
as preprocessing does; everything else that does not fit the format is a one-line DataError naming
the file and line.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from megapre.data.errors import DataError
from megapre.errors import ConfigError

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
KIND_MIN_LENGTH = {"bert": 3, "gpt": 2}  # [CLS] [SEP] + one token; one token + [eod]


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class TaskColumns:
    """Which column (TSV/CSV) or object key (JSONL) holds the text, the optional pair and the label."""

    text_key: str = "sentence"  # --text-key
    text_pair_key: str | None = None  # --text-pair-key (sentence pairs)
    label_key: str = "label"  # --label-key

    def keys(self) -> list[tuple[str, str]]:
        """(key, flag) of every column in use: text, pair (when set), label."""
        out = [(self.text_key, "--text-key")]
        if self.text_pair_key is not None:
            out.append((self.text_pair_key, "--text-pair-key"))
        out.append((self.label_key, "--label-key"))
        return out

    def positional(self) -> bool:
        """True when the keys are column numbers (TSV/CSV without header); mixing is a ConfigError."""
        kinds = {_is_position(k) for k, _ in self.keys()}
        if len(kinds) == 2:
            flags = ", ".join(f"{flag} {key}" for key, flag in self.keys())
            raise ConfigError(
                f"{flags}: column numbers and column names are mixed; give numbers for all (a file "
                "without header row) or names for all (the header's names)"
            )
        return kinds == {True}


def _is_position(key: str) -> bool:
    return key.isascii() and key.isdigit()


@dataclass
class TaskExample:
    """One labelled row; `label` as written in the file (stripped; str(x) for JSON numbers)."""

    text: str
    pair: str | None
    label: str
    source: str  # "path:line", 1-based physical line where the row starts


@dataclass
class ReadResult:
    examples: list[TaskExample]
    skipped_empty: int  # rows whose text (or pair) is empty or whitespace: counted, not an error


def task_format(path: str | Path) -> str:
    """'tsv', 'csv' or 'jsonl' from the file name (a '.gz' after it is allowed)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    fmt = FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise DataError(
            f"{path}: unknown task file type {Path(name).suffix or '(no extension)'!r}; name it .tsv, .csv "
            "or .jsonl (optionally .gz) after its content: tab-separated, comma-separated or one JSON "
            "object per line"
        )
    return fmt


def read_task_file(path: str | Path, columns: TaskColumns) -> ReadResult:
    """The labelled examples of one TSV/CSV/JSONL file, in file order."""
    _check_path(Path(path))
    fmt = task_format(path)
    text = _load_text(Path(path))
    rows = _jsonl_records(path, text, columns) if fmt == "jsonl" else _table_records(path, fmt, text, columns)
    examples, skipped = [], 0
    for line, fields in rows:
        if fields is None:
            skipped += 1
            continue
        text_value, pair, label = fields
        if not text_value.strip() or (columns.text_pair_key is not None and not (pair or "").strip()):
            skipped += 1
            continue
        if label is None or not label.strip():
            raise DataError(
                f"{path}:{line}: no label in column {columns.label_key!r} (--label-key); every row needs "
                "one (fix or remove the row)"
            )
        examples.append(TaskExample(text_value, pair, label.strip(), f"{path}:{line}"))
    if not examples:
        empty = f" ({skipped} rows with empty text skipped)" if skipped else ""
        raise DataError(f"{path}: no examples{empty}; expected rows of text and label in this file")
    return ReadResult(examples, skipped)


def read_task_files(paths: Sequence[str | Path], columns: TaskColumns) -> ReadResult:
    """Several files' examples concatenated in the order given (e.g. `--train-data a.tsv b.tsv`)."""
    if not paths:
        raise DataError("no task files given: pass at least one TSV/CSV/JSONL file")
    examples, skipped = [], 0
    for path in paths:
        result = read_task_file(path, columns)
        examples.extend(result.examples)
        skipped += result.skipped_empty
    return ReadResult(examples, skipped)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file; pass the path of a TSV/CSV/JSONL task file")
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass the path of a TSV/CSV/JSONL task file")


def _load_text(path: Path) -> str:
    """The whole file as text (files for fine-tuning are small); a bad byte is named by its line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a complete gzip file ({e}); decompress it or drop the .gz") from e
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{path}:{_line_of(data, nul)}: binary content (a NUL byte); expected a UTF-8 text "
            "file (TSV, CSV or JSONL)"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{_line_of(data, e.start)}: not UTF-8 text (byte 0x{data[e.start]:02x}); convert the file "
            "to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from e


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _physical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its '\\n' or '\\r\\n'); no empty last line after a final newline."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        yield number, line[:-1] if line.endswith("\r") else line


Record = tuple[int, "tuple[str, str | None, str | None] | None"]  # (line, (text, pair, label) or None = blank)


def _table_rows(path: str | Path, fmt: str, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, fields) of a TSV or CSV file."""
    if fmt == "tsv":
        for number, line in _physical_lines(text):
            yield number, ([] if line == "" else line.split("\t"))
        return
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(
                f"{path}:{start}: not valid CSV ({e}); quote fields that contain commas, quotes or line "
                "breaks (\"a, b\" with inner quotes doubled), or use TSV/JSONL"
            ) from e
        yield start, row
        start = reader.line_num + 1


def _table_records(path: str | Path, fmt: str, text: str, columns: TaskColumns) -> Iterator[Record]:
    sep = "tab-separated" if fmt == "tsv" else "comma-separated"
    rows = _table_rows(path, fmt, text)
    positional = columns.positional()
    if positional:
        width, index = None, [int(k) for k, _ in columns.keys()]
    else:
        header = next((r for r in rows if r[1]), None)
        if header is None:
            raise DataError(f"{path}: no examples (empty file); expected a header row and rows of text and label")
        width, names = len(header[1]), [h.strip() for h in header[1]]
        index = [_header_index(path, names, key, flag, header[0]) for key, flag in columns.keys()]
    for line, fields in rows:
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            yield line, None
            continue
        if width is None:
            width = len(fields)
            if max(index) >= width:
                _raise_position(path, line, columns, width, sep)
        if len(fields) != width:
            hint = ("TSV has no quoting: a tab inside a text splits it; remove tabs from the texts or "
                    "write CSV/JSONL") if fmt == "tsv" else "check the quoting of this row"
            raise DataError(f"{path}:{line}: {len(fields)} {sep} fields, expected {width} like the rows "
                            f"before; {hint}")
        picked = [fields[i] for i in index]
        label = picked[-1]
        yield line, (picked[0], picked[1] if columns.text_pair_key is not None else None, label)


def _header_index(path: str | Path, names: list[str], key: str, flag: str, line: int) -> int:
    if key in names:
        return names.index(key)
    raise DataError(
        f"{path}:{line}: no column {key!r} ({flag}); the header row has columns {names}. Pass {flag} "
        "with one of them, or column numbers (0, 1, ...) for a file without a header row"
    )


def _raise_position(path: str | Path, line: int, columns: TaskColumns, width: int, sep: str) -> None:
    key, flag = max(columns.keys(), key=lambda kf: int(kf[0]))
    raise DataError(
        f"{path}:{line}: {flag} {key} selects column {key} but rows have {width} {sep} fields "
        f"(columns 0..{width - 1}); pass column numbers below {width}"
    )


def _jsonl_records(path: str | Path, text: str, columns: TaskColumns) -> Iterator[Record]:
    if text.lstrip()[:1] == "[":
        raise DataError(f"{path}: a JSON array; write one JSON object per line (JSONL) instead")
    for line, raw in _physical_lines(text):
        if not raw.strip():
            yield line, None
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: not JSON ({e.msg}, column {e.colno}); JSONL needs one JSON "
                            "object per line") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: a JSON {type(obj).__name__}, expected an object with keys "
                            f"{[k for k, _ in columns.keys()]} (one object per line)")
        for key, flag in columns.keys()[:-1]:
            if key not in obj:
                raise DataError(f"{path}:{line}: no key {key!r} ({flag}); the object has keys {list(obj)}")
        pair = None if columns.text_pair_key is None else _json_text(path, line, obj, columns.text_pair_key)
        yield line, (_json_text(path, line, obj, columns.text_key), pair, _json_label(obj.get(columns.label_key)))


def _json_text(path: str | Path, line: int, obj: dict, key: str) -> str:
    value = obj[key]
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        raise DataError(f"{path}:{line}: key {key!r} holds a JSON {type(value).__name__}, expected a string")
    return value if isinstance(value, str) else _json_label(value)


def _json_label(value: Any) -> str | None:
    """A JSON scalar as the file writes it: 1 -> '1', 0.5 -> '0.5', true -> 'true'; null -> None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


# ------------------------------------------------------------------------------------------- labels
def _as_int(label: str) -> int | None:
    try:
        return int(label)
    except ValueError:
        return None


def _as_float(label: str) -> float | None:
    try:
        value = float(label)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class LabelSet:
    """The classes of a task in logit order (empty for regression); saved with the fine-tuned model."""

    names: tuple[str, ...]
    regression: bool = False

    @property
    def num_classes(self) -> int:
        """Width of the classifier: 1 for regression."""
        return 1 if self.regression else len(self.names)

    @classmethod
    def build(cls, train: Sequence[TaskExample], label_names: Sequence[str] | None,
              num_classes: int | None) -> "LabelSet":
        """Classes from `--label-names` (that order) or the sorted training labels (numerically when
        all are integers); `--num-classes 1` is regression."""
        if not train:
            raise DataError("no training examples to take the labels from")
        if num_classes is not None and num_classes < 1:
            raise ConfigError(f"--num-classes {num_classes}: must be 1 (regression) or the number of classes")
        if num_classes == 1:
            return cls._regression(train, label_names)
        if label_names is not None:
            names = tuple(str(n).strip() for n in label_names)
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup or not all(names):
                raise ConfigError(f"--label-names {list(label_names)}: names must be non-empty and distinct "
                                  f"(repeated: {dup})")
            known = set(names)
            for ex in train:
                if ex.label not in known:
                    raise DataError(f"label {ex.label!r} at {ex.source} is not in --label-names {list(names)}; "
                                    "add it there or fix the row")
        else:
            names = _sorted_labels({ex.label for ex in train})
        found = _sorted_labels({ex.label for ex in train})
        if num_classes is not None and num_classes != len(names):
            raise ConfigError(f"--num-classes {num_classes} but the labels are {list(names)} ({len(names)} "
                              f"classes; training data has {list(found)}); drop --num-classes or fix the labels")
        if len(found) < 2:
            raise DataError(f"the training data has a single label {found[0]!r} (e.g. at {train[0].source}): "
                            "nothing to learn; check --label-key and the files")
        return cls(names, False)

    @classmethod
    def _regression(cls, train: Sequence[TaskExample], label_names: Sequence[str] | None) -> "LabelSet":
        if label_names is not None:
            raise ConfigError("--label-names with --num-classes 1 (regression): a regression has no classes; "
                              "drop one of the two flags")
        for ex in train:
            if _as_float(ex.label) is None:
                raise DataError(f"label {ex.label!r} at {ex.source} is not a finite number, which --num-classes 1 "
                                "(regression) needs; fix the row or drop --num-classes 1 for classification")
        return cls((), True)

    def encode(self, example: TaskExample) -> int | float:
        """The class id (or the float target) of `example`; unknown labels are a DataError."""
        if self.regression:
            value = _as_float(example.label)
            if value is None:
                raise DataError(f"label {example.label!r} at {example.source} is not a finite number "
                                "(this is a regression task: --num-classes 1)")
            return value
        index = self._index().get(example.label)
        if index is None:
            raise DataError(f"label {example.label!r} at {example.source} is not one of the training labels "
                            f"{list(self.names)}; pass --label-names with every class when training, or fix "
                            "the row")
        return index

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {name: i for i, name in enumerate(self.names)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "regression": self.regression}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelSet":
        try:
            names, regression = tuple(str(n) for n in d["names"]), bool(d["regression"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"label set {d!r}: expected {{'names': [...], 'regression': bool}}") from e
        if regression == bool(names) or len(set(names)) != len(names):
            raise ConfigError(f"label set {d!r}: a classification needs distinct names, a regression none")
        return cls(names, regression)


def _sorted_labels(labels: set[str]) -> tuple[str, ...]:
    """Sorted; numerically when every label is an integer ('2' before '10')."""
    if all(_as_int(x) is not None for x in labels):
        return tuple(sorted(labels, key=lambda x: (int(x), x)))
    return tuple(sorted(labels))


# ----------------------------------------------------------------------------------------- encoding
@dataclass
class EncodedTask:
    """Token ids of every example, ready for batching (no padding: batches pad to their longest)."""

    tokens: list[np.ndarray]  # int32 ids per example
    types: list[np.ndarray]  # int8 token types (BERT: 0 first segment with [CLS] and its [SEP], 1 second)
    labels: np.ndarray  # int64 class ids, or float32 targets for regression
    sources: list[str]  # "path:line" per example
    truncated: int  # examples cut to fit seq_length

    def __len__(self) -> int:
        return len(self.tokens)

    def lengths(self) -> np.ndarray:
        """int64 length of each example, in tokens."""
        cached = self.__dict__.get("_lengths")
        if cached is None or cached.size != len(self.tokens):
            cached = np.fromiter((t.size for t in self.tokens), dtype=np.int64, count=len(self.tokens))
            self.__dict__["_lengths"] = cached
        return cached

    def sample(self, index: int, weight: float = 1.0) -> dict[str, Any]:
        """The collate() input of example `index`."""
        return {"tokens": self.tokens[index], "types": self.types[index], "label": self.labels[index].item(),
                "weight": weight, "index": index}


def encode_examples(examples: Sequence[TaskExample], labels: LabelSet, tokenizer: Any, kind: str,
                    seq_length: int) -> EncodedTask:
    """Token ids with the model's special tokens, cut to `seq_length` (counted in `truncated`)."""
    special = _check_encoding(tokenizer, kind, seq_length)
    targets = [labels.encode(ex) for ex in examples]
    first = tokenizer.encode_batch([ex.text for ex in examples])
    paired = [i for i, ex in enumerate(examples) if ex.pair is not None]
    second: list[list[int] | None] = [None] * len(examples)
    for i, ids in zip(paired, tokenizer.encode_batch([examples[i].pair for i in paired]) if paired else []):
        second[i] = ids
    assemble = _assemble_bert if kind == "bert" else _assemble_gpt
    tokens, types, truncated = [], [], 0
    for a, b in zip(first, second):
        ids, segment, cut = assemble(list(a), None if b is None else list(b), special, seq_length)
        tokens.append(np.asarray(ids, dtype=np.int32))
        types.append(np.asarray(segment, dtype=np.int8))
        truncated += cut
    dtype = np.float32 if labels.regression else np.int64
    return EncodedTask(tokens, types, np.asarray(targets, dtype=dtype).reshape(-1), [ex.source for ex in examples],
                       truncated)


def _check_encoding(tokenizer: Any, kind: str, seq_length: int) -> dict[str, int]:
    if kind not in KIND_MIN_LENGTH:
        raise ConfigError(f"model kind {kind!r}: task encoding knows {sorted(KIND_MIN_LENGTH)}")
    if seq_length < KIND_MIN_LENGTH[kind]:
        raise ConfigError(f"--seq-length {seq_length}: a {kind.upper()} example needs at least "
                          f"{KIND_MIN_LENGTH[kind]} tokens (its special tokens and one of text)")
    needed = ("cls", "sep") if kind == "bert" else ("eod",)
    missing = [name for name in needed if getattr(tokenizer, name, None) is None]
    if missing:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name', type(tokenizer).__name__)} has no "
                          f"{'/'.join(missing)} token, which {kind.upper()} fine-tuning inputs need; use a "
                          f"tokenizer with {'[CLS] and [SEP]' if kind == 'bert' else 'an end-of-document token'}")
    return {name: int(getattr(tokenizer, name)) for name in needed}


def longest_first(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths after removing tokens one at a time from the end of the longer segment (the second on
    a tie) until la + lb <= budget: BERT's and Hugging Face's `longest_first`, in closed form."""
    excess = la + lb - budget
    if excess <= 0:
        return la, lb
    if la > lb:
        d = min(la - lb, excess)
        la, excess = la - d, excess - d
    elif lb > la:
        d = min(lb - la, excess)
        lb, excess = lb - d, excess - d
    return la - excess // 2, lb - (excess + 1) // 2


def _assemble_bert(a: list[int], b: list[int] | None, special: dict[str, int],
                   seq_length: int) -> tuple[list[int], list[int], bool]:
    cls, sep = special["cls"], special["sep"]
    if b is None:
        cut = len(a) > seq_length - 2
        a = a[: seq_length - 2]
        return [cls, *a, sep], [0] * (len(a) + 2), cut
    la, lb = longest_first(len(a), len(b), seq_length - 3)
    cut = (la, lb) != (len(a), len(b))
    a, b = a[:la], b[:lb]
    return [cls, *a, sep, *b, sep], [0] * (la + 2) + [1] * (lb + 1), cut


def _assemble_gpt(a: list[int], b: list[int] | None, special: dict[str, int],
                  seq_length: int) -> tuple[list[int], list[int], bool]:
    eod = special["eod"]
    ids = a if b is None else [*a, eod, *b]
    cut = len(ids) > seq_length - 1
    ids = [*ids[: seq_length - 1], eod]
    return ids, [0] * len(ids), cut
