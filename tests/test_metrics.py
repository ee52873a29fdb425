"""Slide-level metrics agree with scikit-learn and with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    roc_auc_score,
)

from fedslide.common.metrics import (
    METRIC_NAMES,
    brier,
    classification_metrics,
    expected_calibration_error,
    roc_auc,
    summarize,
)


def _binary_case() -> tuple[np.ndarray, np.ndarray]:
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.3, 0.7, 0.2, 0.55, 0.35])
    return y, np.stack([1 - p1, p1], axis=1)


def test_binary_metrics_equal_sklearn() -> None:
    y, probs = _binary_case()
    pred = (probs[:, 1] > 0.5).astype(int)
    m = classification_metrics(y, probs)
    assert set(m) == set(METRIC_NAMES)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert m["acc"] == pytest.approx(accuracy_score(y, pred)) == pytest.approx(0.7)
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["brier"] == pytest.approx(brier_score_loss(y, probs[:, 1]))
    assert m["brier"] == pytest.approx(np.mean((probs[:, 1] - y) ** 2))


def test_binary_f1_is_of_the_positive_class() -> None:
    y = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    # class 1: tp=1, fp=1, fn=0 -> precision 0.5, recall 1 -> F1 2/3 (class 0's F1 would be 0.8)
    assert classification_metrics(y, probs)["f1"] == pytest.approx(2 / 3)


def test_multiclass_macro_auc_f1_and_brier() -> None:
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(3), 10)
    logits = rng.normal(size=(30, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs)
    expected_auc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert m["auc"] == pytest.approx(expected_auc)
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(3)]))
    assert m["f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    onehot = np.eye(3)[y]
    assert m["brier"] == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def test_multiclass_auc_with_a_class_absent_averages_present_classes() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    expected = np.mean([roc_auc_score(y == 0, probs[:, 0]), roc_auc_score(y == 1, probs[:, 1])])
    assert roc_auc(y, probs) == pytest.approx(expected)


def test_auc_undefined_with_one_class() -> None:
    probs = np.array([[0.2, 0.8], [0.4, 0.6]])
    assert math.isnan(roc_auc([1, 1], probs))
    m = classification_metrics([1, 1], probs)
    assert math.isnan(m["auc"]) and m["acc"] == 1.0


def test_ece_zero_when_calibrated() -> None:
    # 10 slides at confidence 0.8 of which 8 are right, 10 at 0.6 of which 6 are right.
    probs = np.array([[0.2, 0.8]] * 10 + [[0.6, 0.4]] * 10)
    y = np.array([1] * 8 + [0] * 2 + [0] * 6 + [1] * 4)
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident_known_value() -> None:
    # confidence 0.9 everywhere, half right -> |0.5 - 0.9| = 0.4
    probs = np.array([[0.1, 0.9]] * 10)
    y = np.array([1] * 5 + [0] * 5)
    assert expected_calibration_error(y, probs, n_bins=15) == pytest.approx(0.4)


def test_ece_weights_bins_by_size() -> None:
    # bin (0.9, 1.0]: 3 slides, conf 0.95, 2 right -> |2/3 - 0.95| ; bin (0.6, 0.7]: 1 slide, conf 0.65, right -> 0.35
    probs = np.array([[0.05, 0.95]] * 3 + [[0.65, 0.35]])
    y = np.array([1, 1, 0, 0])
    expected = 0.75 * abs(2 / 3 - 0.95) + 0.25 * abs(1.0 - 0.65)
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx(expected)


def test_brier_binary_in_unit_range_multiclass_sum_over_classes() -> None:
    assert brier([1, 0], np.array([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(0.5)
    assert brier([0, 1], np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])) == pytest.approx(2.0)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics([0, 1], np.array([0.2, 0.8]))
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics([0, 2], np.array([[0.2, 0.8], [0.5, 0.5]]))


def test_summarize_mean_sd_and_nan() -> None:
    folds = [{"auc": 0.8, "acc": 0.7}, {"auc": 0.9, "acc": 0.9}, {"auc": math.nan, "acc": 0.8}]
    s = summarize(folds)
    assert s["acc"]["mean"] == pytest.approx(0.8)
    assert s["acc"]["sd"] == pytest.approx(np.std([0.7, 0.9, 0.8], ddof=1))
    assert s["acc"]["n"] == 3
    assert s["auc"]["mean"] == pytest.approx(0.85) and s["auc"]["n"] == 2
    assert summarize([{"auc": 0.8}])["auc"]["sd"] == 0.0
