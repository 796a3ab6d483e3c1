"""Task reports against scikit-learn's metrics, the table, and the atomic writers."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megapre.train import task_report
from megapre.train.task_report import (classification_report, format_report, metrics_record,
                                       rankdata, regression_report, write_predictions,
                                       write_report)

metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference")
try:  # tie-averaged ranks to compare with; those assertions are left out without scipy
    from scipy import stats
except ImportError:  # pragma: no cover - scipy comes with scikit-learn
    stats = None


def check_against_sklearn(labels: np.ndarray, predictions: np.ndarray, names: list[str]) -> dict:
    report = classification_report(labels, predictions, names, loss=0.25)
    k = len(names)
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(labels, predictions))
    assert report["macro_f1"] == pytest.approx(
        metrics.f1_score(labels, predictions, average="macro", zero_division=0))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predictions, labels=list(range(k)), zero_division=0)
    for i, name in enumerate(names):
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
    assert report["confusion_matrix"] == metrics.confusion_matrix(
        labels, predictions, labels=list(range(k))).tolist()
    assert report["examples"] == len(labels) and report["loss"] == 0.25 and report["names"] == names
    return report


@pytest.mark.parametrize("seed,k,n", [(0, 2, 50), (1, 3, 200), (2, 5, 37), (3, 4, 1000)])
def test_classification_matches_sklearn_on_random_data(seed: int, k: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    # mostly right, some noise: the numbers are neither 0 nor 1
    predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))
    check_against_sklearn(labels, predictions, [f"c{i}" for i in range(k)])


def test_class_never_predicted_has_zero_precision() -> None:
    labels = np.array([0, 1, 2, 2, 1, 0, 2])
    predictions = np.array([0, 1, 1, 1, 1, 0, 0])  # class 2 never predicted
    report = check_against_sklearn(labels, predictions, ["a", "b", "c"])
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}


def test_class_absent_from_labels_has_zero_recall() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    predictions = np.array([0, 2, 1, 1, 2])  # class 2 predicted but never true
    report = check_against_sklearn(labels, predictions, ["a", "b", "c"])
    assert report["per_class"]["c"]["recall"] == 0.0 and report["per_class"]["c"]["support"] == 0


def test_class_absent_everywhere_is_left_out_of_macro_f1() -> None:
    labels, predictions = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    report = check_against_sklearn(labels, predictions, ["a", "b", "unused"])
    assert report["per_class"]["unused"]["support"] == 0
    assert report["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_single_example() -> None:
    report = check_against_sklearn(np.array([1]), np.array([1]), ["neg", "pos"])
    assert report["accuracy"] == 1.0 and report["macro_f1"] == 1.0
    wrong = check_against_sklearn(np.array([1]), np.array([0]), ["neg", "pos"])
    assert wrong["accuracy"] == 0.0 and wrong["confusion_matrix"] == [[0, 0], [1, 0]]


def test_four_string_classes_by_name_and_by_index() -> None:
    names = ["World", "Sports", "Business", "Sci/Tech"]
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, 300)
    predictions = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 4, 300))
    by_index = check_against_sklearn(labels, predictions, names)
    by_name = classification_report(np.array(names)[labels], np.array(names)[predictions], names,
                                     loss=0.25)
    assert by_name == by_index
    text_labels = np.array(names, dtype=object)[labels]
    text_predictions = np.array(names, dtype=object)[predictions]
    expected = metrics.f1_score(text_labels, text_predictions, average=None, labels=names)
    assert [by_index["per_class"][n]["f1"] for n in names] == pytest.approx(expected)


@pytest.mark.parametrize("labels,predictions,names,match", [
    ([0, 1], [0], ["a", "b"], "2 labels but 1 predictions"),
    ([], [], ["a", "b"], "at least one example"),
    ([0, 2], [0, 1], ["a", "b"], r"0\.\.1"),
    (["a", "x"], ["a", "b"], ["a", "b"], "'x'"),
    ([0, 1], [0, 1], ["a", "a"], "repeat"),
    ([0.5, 1], [0, 1], ["a", "b"], "class indices"),
])
def test_classification_bad_input(labels, predictions, names, match) -> None:
    with pytest.raises(ValueError, match=match):
        classification_report(np.array(labels), np.array(predictions), names)


def test_regression_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    targets = rng.normal(size=200)
    predictions = targets + rng.normal(scale=0.5, size=200)
    report = regression_report(targets, predictions, loss=1.5)
    err = predictions - targets
    assert report["mse"] == pytest.approx(np.mean(err ** 2))
    assert report["rmse"] == pytest.approx(np.sqrt(np.mean(err ** 2)))
    assert report["mae"] == pytest.approx(np.mean(np.abs(err)))
    assert report["pearson"] == pytest.approx(np.corrcoef(targets, predictions)[0, 1])
    assert report["loss"] == 1.5 and report["examples"] == 200 and report["task"] == "regression"
    # no ties here, so the ranks are the argsort's inverse and Spearman is Pearson of those
    ranks = lambda v: np.argsort(np.argsort(v)) + 1.0  # noqa: E731
    assert report["spearman"] == pytest.approx(
        np.corrcoef(ranks(targets), ranks(predictions))[0, 1])


def test_spearman_averages_tied_ranks() -> None:
    targets = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0])
    predictions = np.array([0.5, 0.5, 2.0, 2.0, 4.0, 9.0, 9.0, 9.0])
    assert rankdata(targets).tolist() == [2.0, 3.5, 3.5, 5.0, 7.0, 7.0, 7.0, 1.0]
    assert rankdata(predictions).tolist() == [1.5, 1.5, 3.5, 3.5, 5.0, 7.0, 7.0, 7.0]
    expected = np.corrcoef(rankdata(targets), rankdata(predictions))[0, 1]
    assert regression_report(targets, predictions)["spearman"] == pytest.approx(expected)
    if stats is not None:
        assert expected == pytest.approx(stats.spearmanr(targets, predictions).statistic)


@pytest.mark.skipif(stats is None, reason="scipy is the reference for ranks with many ties")
def test_spearman_agrees_with_scipy_on_random_ties() -> None:
    rng = np.random.default_rng(11)
    targets, predictions = rng.integers(0, 6, 300), rng.integers(0, 4, 300)
    assert rankdata(targets) == pytest.approx(stats.rankdata(targets, method="average"))
    assert regression_report(targets, predictions)["spearman"] == pytest.approx(
        stats.spearmanr(targets, predictions).statistic)


def test_correlations_undefined_are_none() -> None:
    assert regression_report([1.0], [2.0])["pearson"] is None
    flat = regression_report([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])
    assert flat["pearson"] is None and flat["spearman"] is None and flat["mse"] > 0
    with pytest.raises(ValueError, match="3 targets but 2 predictions"):
        regression_report([1.0, 2.0, 3.0], [1.0, 2.0])


def test_format_report_shows_the_numbers() -> None:
    names = ["World", "Sports", "Business", "Science and Technology news"]
    labels = np.array([0, 1, 2, 3, 3, 1, 0, 2])
    predictions = np.array([0, 2, 2, 3, 1, 1, 0, 0])
    report = classification_report(labels, predictions, names, loss=0.4321)
    text = format_report(report, "AG News test")
    lines = text.splitlines()
    assert lines[0] == "AG News test (8 examples)"
    assert f"accuracy {report['accuracy']:.4f}" in text and "macro-F1 " + f"{report['macro_f1']:.4f}" in text
    assert "loss 0.4321" in text
    for name in names[:3]:
        row = report["per_class"][name]
        line = next(l for l in lines if l.strip().startswith(name) and "." in l)
        assert f"{row['precision']:.4f}" in line and f"{row['f1']:.4f}" in line
        assert line.split()[-1] == str(row["support"])
    assert "Science and Technology news" not in text  # cut to the column
    matrix_rows = lines[-len(names):]
    for row, counts in zip(matrix_rows, report["confusion_matrix"]):
        assert [int(c) for c in row.split()[-len(names):]] == counts
    header = lines[-len(names) - 1]
    assert "World" in header and "Sports" in header and "Science.." in header
    assert len({len(l) for l in matrix_rows + [header]}) == 1  # fixed width


def test_format_regression_report() -> None:
    report = regression_report([1.0, 2.0, 3.0], [1.5, 2.0, 2.0], loss=None)
    text = format_report(report, "STS-B dev")
    assert text.startswith("STS-B dev (3 examples)")
    assert f"{report['mse']:.4f}" in text and f"{report['pearson']:.4f}" in text
    assert "loss      n/a" in text


def test_metrics_record_is_flat_with_safe_keys() -> None:
    names = ["World", "Sci/Tech", "Big Business", "sci tech"]
    report = classification_report(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 2]), names, loss=0.1)
    record = metrics_record(report, "valid", 2, 300)
    assert record["iteration"] == 300 and record["epoch"] == 2 and record["split"] == "valid"
    assert record["accuracy"] == 0.75 and record["loss"] == 0.1
    assert set(k for k in record if k.startswith("f1_")) == {
        "f1_world", "f1_sci_tech", "f1_big_business", "f1_sci_tech_3"}
    assert record["f1_sci_tech_3"] == 0.0 and record["f1_world"] == 1.0
    assert all(isinstance(v, (int, float, str, type(None))) for v in record.values())
    json.dumps(record)
    reg = metrics_record(regression_report([1.0, 2.0], [1.0, 3.0]), "test", None, 7)
    assert reg["epoch"] is None and reg["mse"] == 0.5 and "pearson" in reg


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def test_write_report_round_trips(tmp_path) -> None:
    valid = classification_report(np.array([0, 1, 1]), np.array([0, 1, 0]), ["neg", "pos"], 0.3)
    test = regression_report([1.0, 2.0], [1.5, 2.5])
    path = tmp_path / "out" / "report.json"
    write_report(path, {"valid": valid, "test": test})
    assert json.loads(path.read_text()) == {"valid": valid, "test": test}
    assert leftovers(path.parent) == []


def test_failed_write_report_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "report.json"
    good = {"valid": classification_report(np.array([0, 1]), np.array([0, 1]), ["a", "b"])}
    write_report(path, good)
    before = path.read_bytes()
    with pytest.raises(TypeError):  # the encoder has written part of the file when it meets this
        write_report(path, {"valid": good["valid"], "test": {"bad": object()}})
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_predictions_file_one_line_per_example(tmp_path) -> None:
    names = ["neg", "pos"]
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.45, 0.55]])
    sources = ["test.tsv:2", "test.tsv:3", "test.tsv:4"]
    path = tmp_path / "predictions.tsv"
    write_predictions(path, sources, [0, 1, 1], probabilities, names)
    lines = path.read_text().splitlines()
    assert lines == ["source\tprediction\tprobability", "test.tsv:2\tneg\t0.900000",
                     "test.tsv:3\tpos\t0.800000", "test.tsv:4\tpos\t0.550000"]
    # names as predictions, and probabilities of the predicted class only
    write_predictions(path, sources, ["neg", "pos", "pos"], np.array([0.9, 0.8, 0.55]), names)
    assert path.read_text().splitlines() == lines
    assert leftovers(tmp_path) == []


def test_regression_predictions_file(tmp_path) -> None:
    path = tmp_path / "predictions.tsv"
    predictions = np.array([0.5, 2.25, -1.0], dtype=np.float32)
    write_predictions(path, ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"], list(predictions), None, None)
    lines = path.read_text().splitlines()
    assert lines[0] == "source\tprediction" and len(lines) == 4
    assert [float(l.split("\t")[1]) for l in lines[1:]] == [0.5, 2.25, -1.0]


def test_failed_predictions_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "predictions.tsv"
    sources = [f"f.tsv:{i}" for i in range(10)]
    write_predictions(path, sources, [0] * 10, np.full((10, 2), 0.5), ["a", "b"])
    before = path.read_bytes()
    real, calls = task_report._prediction_line, []

    def fail_on_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(task_report, "_prediction_line", fail_on_fifth)
    with pytest.raises(OSError, match="disk full"):
        write_predictions(path, sources, [1] * 10, np.full((10, 2), 0.5), ["a", "b"])
    assert len(calls) == 5  # four lines were already written to the temporary file
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "report.json"
    path.write_text("old\n")

    def no_rename(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(task_report.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename refused"):
        write_report(path, {"test": regression_report([1.0, 2.0], [1.0, 2.0])})
    assert path.read_text() == "old\n" and leftovers(tmp_path) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(sources=["a:1"], predictions=[0, 1]), "1 sources but 2 predictions"),
    (dict(probabilities=np.zeros((2, 3))), "3 columns but there are 2"),
    (dict(probabilities=np.zeros(3)), r"must be \[2\]"),
])
def test_predictions_bad_input(tmp_path, kwargs, match) -> None:
    args = dict(sources=["a:1", "a:2"], predictions=[0, 1], probabilities=np.zeros((2, 2)),
                names=["x", "y"])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        write_predictions(tmp_path / "p.tsv", **args)
    assert not os.path.exists(tmp_path / "p.tsv")
