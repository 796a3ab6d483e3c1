"""Evaluation reports of a fine-tuned task: the numbers (accuracy, macro-F1, per-class
precision/recall/F1, confusion matrix; or MSE/MAE/correlations), a readable table of them, and the
files they go to (report JSON, per-example predictions TSV, flat records for the metrics JSONL).

Pure numpy, so the fine-tuning and evaluation programs need no scikit-learn; the tests hold every
number to scikit-learn's. Writers go through a temporary file and a rename, so a crash mid-write
leaves the previous file (or none), never half a report.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

# Widths of the table's name column and of a confusion-matrix column header (longer names are cut).
NAME_WIDTH = 16
MATRIX_HEADER_WIDTH = 10
MATRIX_CORNER = "true \\ pred"


# ----------------------------------------------------------------------------- numbers

def _as_indices(values: np.ndarray | Sequence, names: Sequence[str], what: str) -> np.ndarray:
    """Class indices 0..K-1; string labels are looked up in `names`."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind in "USO":
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(v) for v in arr.tolist() if str(v) not in index})
        if unknown:
            raise ValueError(f"{what} hold {unknown[:5]}, not among the class names {list(names)}")
        return np.fromiter((index[str(v)] for v in arr.tolist()), dtype=np.int64, count=arr.size)
    if arr.dtype.kind == "f" and arr.size and not np.all(arr == np.round(arr)):
        raise ValueError(f"{what} must be class indices, got non-integer values")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= len(names)):
        raise ValueError(f"{what} must lie in 0..{len(names) - 1} ({len(names)} class names), "
                         f"got {int(arr.min())}..{int(arr.max())}")
    return arr


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted] for class indices in 0..num_classes-1."""
    flat = labels * num_classes + predictions
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(labels: np.ndarray, predictions: np.ndarray, names: list[str],
                          loss: float | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    `labels` and `predictions` are class indices into `names` (or the names themselves). A ratio
    whose denominator is zero - the precision of a class never predicted, the recall of a class
    absent from `labels` - is 0.0, as scikit-learn's zero_division=0. Macro-F1 averages over the
    classes that occur in `labels` or `predictions` (scikit-learn's default label set), so a class
    missing from a small evaluation set does not pull the average down; every class still has its
    row in `per_class` and the matrix. Confusion-matrix rows are true classes, columns predicted,
    both in `names` order.
    """
    names = [str(n) for n in names]
    if not names:
        raise ValueError("classification_report needs at least one class name")
    if len(set(names)) != len(names):
        raise ValueError(f"class names repeat: {names}")
    y = _as_indices(labels, names, "labels")
    p = _as_indices(predictions, names, "predictions")
    if y.size != p.size:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    if y.size == 0:
        raise ValueError("classification_report needs at least one example")
    k = len(names)
    matrix = confusion_matrix(y, p, k)
    hits = np.diag(matrix).astype(np.float64)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    precision, recall = _divide(hits, predicted), _divide(hits, support)
    f1 = _divide(2 * precision * recall, precision + recall)
    seen = (support + predicted) > 0
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                        "f1": float(f1[i]), "support": int(support[i])}
                 for i, name in enumerate(names)}
    return {"task": "classification", "examples": int(y.size),
            "accuracy": float(hits.sum() / y.size), "macro_f1": float(f1[seen].mean()),
            "loss": None if loss is None else float(loss), "per_class": per_class,
            "confusion_matrix": matrix.tolist(), "names": names}


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span (scipy's 'average')."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], values.size]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson's r; None when undefined (fewer than 2 examples or a constant side)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2:
        return None
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float(da @ da) * float(db @ db))
    if den == 0.0 or not math.isfinite(den):
        return None
    return float(np.clip((da @ db) / den, -1.0, 1.0))


def regression_report(targets: np.ndarray, predictions: np.ndarray,
                      loss: float | None = None) -> dict[str, Any]:
    """MSE, RMSE, MAE, Pearson and Spearman (Pearson of the ranks, ties averaged). A correlation
    is None where it is undefined (one example, or constant targets or predictions)."""
    t = np.asarray(targets, dtype=np.float64).reshape(-1)
    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    if t.size != p.size:
        raise ValueError(f"{t.size} targets but {p.size} predictions")
    if t.size == 0:
        raise ValueError("regression_report needs at least one example")
    err = p - t
    mse = float(np.mean(err * err))
    return {"task": "regression", "examples": int(t.size), "mse": mse, "rmse": math.sqrt(mse),
            "mae": float(np.mean(np.abs(err))), "pearson": pearson(t, p),
            "spearman": pearson(rankdata(t), rankdata(p)),
            "loss": None if loss is None else float(loss)}


# ----------------------------------------------------------------------------- table

def _cut(name: str, width: int) -> str:
    """`name` in at most `width` characters ('..' marks a cut)."""
    return name if len(name) <= width else name[:max(width - 2, 1)].rstrip() + ".."


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _per_class_table(report: dict[str, Any]) -> list[str]:
    width = min(max(len(n) for n in report["names"]), NAME_WIDTH)
    width = max(width, len("class"))
    lines = [f"  {'class':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>8}"]
    for name in report["names"]:
        row = report["per_class"][name]
        lines.append(f"  {_cut(name, width):<{width}}  {row['precision']:>9.4f}  "
                     f"{row['recall']:>9.4f}  {row['f1']:>9.4f}  {row['support']:>8d}")
    return lines


def _matrix_table(report: dict[str, Any]) -> list[str]:
    names, matrix = report["names"], report["confusion_matrix"]
    row_width = max(min(max(len(n) for n in names), NAME_WIDTH), len(MATRIX_CORNER))
    biggest = max((len(str(c)) for row in matrix for c in row), default=1)
    heads = [_cut(n, MATRIX_HEADER_WIDTH) for n in names]
    col = max(biggest, max(len(h) for h in heads))
    lines = [f"  {MATRIX_CORNER:<{row_width}}" + "".join(f"  {h:>{col}}" for h in heads)]
    for name, row in zip(names, matrix):
        lines.append(f"  {_cut(name, row_width):<{row_width}}"
                     + "".join(f"  {c:>{col}d}" for c in row))
    return lines


def format_report(report: dict[str, Any], title: str) -> str:
    """The report as a fixed-width table: headline numbers, per-class rows, confusion matrix
    (rows true, columns predicted); for regression the error and correlation metrics."""
    lines = [f"{title} ({report['examples']} examples)"]
    if report["task"] == "regression":
        for key in ("mse", "rmse", "mae", "pearson", "spearman", "loss"):
            lines.append(f"  {key:<9} {_number(report[key])}")
        return "\n".join(lines)
    lines.append(f"  accuracy {_number(report['accuracy'])} | macro-F1 "
                 f"{_number(report['macro_f1'])} | loss {_number(report['loss'])}")
    lines += _per_class_table(report)
    lines.append("  confusion matrix (rows: true class, columns: predicted class)")
    lines += _matrix_table(report)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files

def _write_atomic(path: str | Path, chunks: Iterable[str]) -> None:
    """Write `chunks` to a temporary file beside `path`, then rename it over `path`. If anything
    fails on the way the temporary file is removed and the old `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(path: str | Path, reports: dict[str, dict[str, Any]]) -> None:
    """Write {split: report} (e.g. {"valid": ..., "test": ...}) as indented JSON, atomically."""
    encoder = json.JSONEncoder(indent=2, ensure_ascii=False)
    _write_atomic(path, _with_newline(encoder.iterencode(reports)))


def _with_newline(chunks: Iterable[str]) -> Iterable[str]:
    yield from chunks
    yield "\n"


def _field(value: Any) -> str:
    """One TSV field: tabs and line breaks inside become spaces, so a row stays one line."""
    return re.sub(r"[\t\r\n]", " ", str(value))


def _predicted_probability(probabilities: np.ndarray, i: int, index: int) -> float:
    row = probabilities[i]
    return float(row if probabilities.ndim == 1 else row[index])


def _prediction_line(source: str, prediction: Any, probabilities: np.ndarray | None,
                     names: list[str] | None, i: int) -> str:
    if names is None:
        shown = prediction  # str() of a float (numpy's too) is its shortest round-trip form
        index = int(prediction) if probabilities is not None and probabilities.ndim == 2 else -1
    elif isinstance(prediction, str):
        shown, index = prediction, names.index(prediction)
    else:
        index = int(prediction)
        shown = names[index]
    fields = [_field(source), _field(shown)]
    if probabilities is not None:
        fields.append(f"{_predicted_probability(probabilities, i, index):.6f}")
    return "\t".join(fields) + "\n"


def _prediction_lines(sources: list[str], predictions: list, probabilities: np.ndarray | None,
                      names: list[str] | None) -> Iterable[str]:
    yield "source\tprediction\tprobability\n" if probabilities is not None else "source\tprediction\n"
    for i, (source, prediction) in enumerate(zip(sources, predictions)):
        yield _prediction_line(source, prediction, probabilities, names, i)


def write_predictions(path: str | Path, sources: list[str], predictions: list,
                      probabilities: np.ndarray | None, names: list[str] | None) -> None:
    """One line per input example, in input order, atomically: `source<TAB>prediction<TAB>
    probability` with a header. `source` is "file:line"; a class prediction (an index into
    `names`, or the name) is written as its name; `probabilities` is either [n, classes] (the
    predicted class's column is written) or [n] (already the predicted class's probability).
    Without `probabilities` (regression) the file is `source<TAB>prediction`."""
    if len(sources) != len(predictions):
        raise ValueError(f"{len(sources)} sources but {len(predictions)} predictions")
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim not in (1, 2) or probabilities.shape[0] != len(predictions):
            raise ValueError(f"probabilities must be [{len(predictions)}] or "
                             f"[{len(predictions)}, classes], got {probabilities.shape}")
        if probabilities.ndim == 2 and names is not None and probabilities.shape[1] != len(names):
            raise ValueError(f"probabilities have {probabilities.shape[1]} columns "
                             f"but there are {len(names)} class names")
    if names is not None:
        names = [str(n) for n in names]
    _write_atomic(path, _prediction_lines(list(sources), list(predictions), probabilities, names))


# ----------------------------------------------------------------------------- metrics JSONL

def safe_key(name: str) -> str:
    """A class name as a metrics key: lower case, every run of other characters one '_'."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _class_keys(names: list[str]) -> list[str]:
    """safe_key per class, made unique (an empty or repeated key gets the class index)."""
    keys: list[str] = []
    for i, name in enumerate(names):
        key = safe_key(name) or f"class{i}"
        keys.append(f"{key}_{i}" if key in keys else key)
    return keys


def metrics_record(report: dict[str, Any], split: str, epoch: int | None,
                   iteration: int) -> dict[str, Any]:
    """The report as one flat record for the metrics JSONL (and TensorBoard): headline numbers
    plus f1_<class> per class (classification) or the regression metrics."""
    record: dict[str, Any] = {"iteration": int(iteration), "epoch": epoch, "split": split,
                              "examples": report["examples"]}
    if report["task"] == "regression":
        record.update({k: report[k] for k in ("mse", "rmse", "mae", "pearson", "spearman", "loss")})
        return record
    record.update(accuracy=report["accuracy"], macro_f1=report["macro_f1"], loss=report["loss"])
    for key, name in zip(_class_keys(report["names"]), report["names"]):
        record[f"f1_{key}"] = report["per_class"][name]["f1"]
    return record
