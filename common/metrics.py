"""Slide-level classification metrics and their summary over folds.

Every metric takes integer labels `y_true` [n] in 0..C-1 and class probabilities `probs` [n, C]
(rows sum to 1). Names used everywhere (metrics.json, reports): auc, acc, balanced_acc, f1,
brier, ece. A metric that is undefined on the given slides (e.g. AUC when only one class is
present) is NaN, written as null in JSON.

- auc: ROC AUC; binary: of the class-1 probability; multi-class: macro one-vs-rest
  (over the classes present in `y_true` when some are absent).
- acc / balanced_acc: of the argmax prediction.
- f1: binary: F1 of class 1 (the positive class); multi-class: macro F1.
- brier: scikit-learn's Brier score; binary: mean (p1 - y)^2 in [0, 1]; multi-class: mean over
  slides of the squared distance between the probability vector and the one-hot label, in [0, 2].
- ece: expected calibration error with `n_bins` equal-width bins over the confidence
  (max probability) in (0, 1]: sum over bins of (bin size / n) * |accuracy - mean confidence|.

Per class (`per_class_metrics`, for subtyping tasks): precision / recall / F1, one-vs-rest AUC, classwise ECE
(the same bins over each class's probability, averaged over classes) and the confusion matrix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRIC_NAMES = ("auc", "acc", "balanced_acc", "f1", "brier", "ece")
HIGHER_IS_BETTER = {"auc": True, "acc": True, "balanced_acc": True, "f1": True, "brier": False, "ece": False}
DEFAULT_ECE_BINS = 15


def _check(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] < 2:
        raise ValueError(f"probs must be [n, C>=2] with n = len(y_true) = {y.shape[0]}, got shape {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}, got {sorted(set(y.tolist()))}")
    return y, p


def roc_auc(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC (binary) or macro one-vs-rest AUC (multi-class); NaN with fewer than two classes present."""
    from sklearn.metrics import roc_auc_score  # lazy (scikit-learn costs ~1 s per ClientApp process otherwise)

    y, p = _check(y_true, probs)
    present = np.unique(y)
    if present.size < 2:
        return math.nan
    num_classes = p.shape[1]
    if num_classes == 2:
        return float(roc_auc_score(y, p[:, 1]))
    if present.size == num_classes:
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(num_classes)))
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))


def f1(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """F1 of class 1 (binary) or macro F1 over all classes (multi-class)."""
    from sklearn.metrics import f1_score

    y, p = _check(y_true, probs)
    pred = p.argmax(axis=1)
    if p.shape[1] == 2:
        return float(f1_score(y, pred, pos_label=1, average="binary", zero_division=0.0))
    return float(f1_score(y, pred, labels=np.arange(p.shape[1]), average="macro", zero_division=0.0))


def brier(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """Brier score: binary on the class-1 probability, multi-class over the one-hot label (see module doc)."""
    from sklearn.metrics import brier_score_loss

    y, p = _check(y_true, probs)
    if p.shape[1] == 2:
        return float(brier_score_loss(y, p[:, 1], pos_label=1))
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)  # float32 softmax rows miss scikit-learn's sum-to-one check in float64
    return float(brier_score_loss(y, p, labels=np.arange(p.shape[1])))


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_ECE_BINS
) -> float:
    """ECE over equal-width confidence bins ((0, 1/M], (1/M, 2/M], ...) of the max probability."""
    y, p = _check(y_true, probs)
    if y.size == 0:
        return math.nan
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def confusion(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Confusion matrix [C, C] of the argmax prediction: row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix

    y, p = _check(y_true, probs)
    return confusion_matrix(y, p.argmax(axis=1), labels=np.arange(p.shape[1])).astype(np.int64)


def classwise_ece(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_ECE_BINS) -> np.ndarray:
    """Per-class calibration error [C] (Kull et al. 2019): for class c, equal-width bins over p[:, c] as in
    `expected_calibration_error`, summing (bin size / n) * |share of slides of class c - mean p[:, c]|.
    The classwise ECE is their mean; NaN for every class when there are no slides."""
    y, p = _check(y_true, probs)
    out = np.full(p.shape[1], math.nan)
    if y.size == 0:
        return out
    for c in range(p.shape[1]):
        score, hit = p[:, c], (y == c).astype(np.float64)
        bins = np.clip(np.ceil(score * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
        out[c] = sum(
            float((bins == b).mean() * abs(hit[bins == b].mean() - score[bins == b].mean())) for b in np.unique(bins)
        )
    return out


def per_class_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str], n_bins: int = DEFAULT_ECE_BINS
) -> dict[str, Any]:
    """Per-class report of one set of slides: precision, recall, F1 and one-vs-rest AUC per class name (NaN AUC for
    a class absent or alone), classwise ECE per class and its mean (`classwise_ece`), and the confusion matrix
    (rows = true, columns = predicted, in `classes` order)."""
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    y, p = _check(y_true, probs)
    if len(classes) != p.shape[1]:
        raise ValueError(f"{len(classes)} class names {list(classes)} for probabilities of {p.shape[1]} classes")
    k = p.shape[1]
    pred = p.argmax(axis=1)
    precision, recall, f1s, support = precision_recall_fscore_support(y, pred, labels=np.arange(k), zero_division=0.0)
    auc = [float(roc_auc_score(y == c, p[:, c])) if 0 < int((y == c).sum()) < y.size else math.nan for c in range(k)]
    ece = classwise_ece(y, p, n_bins)
    names = [str(c) for c in classes]
    return {
        "classes": names,
        "support": dict(zip(names, (int(v) for v in support))),
        "precision": dict(zip(names, (float(v) for v in precision))),
        "recall": dict(zip(names, (float(v) for v in recall))),
        "f1": dict(zip(names, (float(v) for v in f1s))),
        "auc_ovr": dict(zip(names, auc)),
        "ece": dict(zip(names, (float(v) for v in ece))),
        "classwise_ece": float(np.mean(ece)) if y.size else math.nan,
        "confusion_matrix": confusion(y, p).tolist(),
    }


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_ECE_BINS
) -> dict[str, float]:
    """All metrics of METRIC_NAMES for one set of slides (NaN where undefined)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    y, p = _check(y_true, probs)
    if y.size == 0:
        return {name: math.nan for name in METRIC_NAMES}
    pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        # one class in y_true and y_pred: balanced accuracy is that class's recall, as intended
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", category=UserWarning)
        balanced = float(balanced_accuracy_score(y, pred))
    return {
        "auc": roc_auc(y, p),
        "acc": float(accuracy_score(y, pred)),
        "balanced_acc": balanced,
        "f1": f1(y, p),
        "brier": brier(y, p),
        "ece": expected_calibration_error(y, p, n_bins=n_bins),
    }


def summarize(per_fold: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1; 0 for one fold) of each metric over folds.

    NaN values (undefined metrics) are left out; `n` counts the folds that entered.
    """
    names = sorted({k for fold in per_fold for k in fold})
    out: dict[str, dict[str, float]] = {}
    for name in names:
        values = np.array([fold[name] for fold in per_fold if name in fold], dtype=np.float64)
        values = values[np.isfinite(values)]
        n = int(values.size)
        out[name] = {
            "mean": float(values.mean()) if n else math.nan,
            "sd": float(values.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan),
            "n": n,
        }
    return out
