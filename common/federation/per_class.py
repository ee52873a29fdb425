"""Per-class evaluation metrics that leave a site (C > 2), and their pooling at the server.

Names carry the class index, never the class name (a name may be any string): `<model>.f1-c<k>`,
`<model>.auc-c<k>` (one-vs-rest), `<model>.ece-c<k>` (classwise calibration error, Kull et al. 2019) and the
confusion counts `<model>.confusion-<true>-<predicted>`. The server maps indices back to the federation's class
names: F1 and the confusion matrix are pooled exactly (counts summed over sites), AUC and ECE per class as the
mean over sites weighted by the site's test slides of that class (slide probabilities never leave the sites).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedslide.common.metrics import DEFAULT_ECE_BINS, per_class_metrics

PER_CLASS_METRICS = ("f1", "auc", "ece")  # per_class_metrics' keys: f1, auc_ovr, ece
_SOURCE = {"f1": "f1", "auc": "auc_ovr", "ece": "ece"}
log = logging.getLogger(__name__)

MAX_PER_CLASS = 8  # a site sends per-class metrics for at most this many classes (BRACS types 7; the byte cap)


def per_class_metric(model: str, metric: str, k: int) -> str:
    """The metric name of class index `k` (`student_low.f1-c2`)."""
    return f"{model}.{metric}-c{k}"


def confusion_metric(model: str, true: int, predicted: int) -> str:
    """The confusion count name of (true class, predicted class) (`student_low.confusion-0-2`)."""
    return f"{model}.confusion-{true}-{predicted}"


def policy_patterns(models: Sequence[str]) -> tuple[str, ...]:
    """Full-match regexes of the per-class metric names of `models` (class indices below MAX_PER_CLASS)."""
    group = "|".join(re.escape(m) for m in models)
    index = "(" + "|".join(str(k) for k in range(MAX_PER_CLASS)) + ")"
    return (
        rf"({group})\.({'|'.join(PER_CLASS_METRICS)})-c{index}",
        rf"({group})\.confusion-{index}-{index}",
    )


def reply_bytes(models: int, metric_bytes: int) -> int:
    """Bytes the per-class metrics of `models` models may add to a reply at MAX_PER_CLASS classes (`metric_bytes`:
    the bound of one serialized metric entry)."""
    k = MAX_PER_CLASS
    return models * (len(PER_CLASS_METRICS) * k + k * k) * metric_bytes


def site_metrics(model: str, labels: np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_ECE_BINS) -> dict[str, float]:
    """A site's per-class metrics of `model` on its slides (finite values only; none for C = 2 or C >
    MAX_PER_CLASS: binary metrics already say it, and more classes would exceed the byte cap)."""
    k = probs.shape[1]
    if k > MAX_PER_CLASS:
        log.info("%s: %d classes, over %d: no per-class metrics leave the site", model, k, MAX_PER_CLASS)
    if k <= 2 or k > MAX_PER_CLASS or not len(labels):
        return {}
    report = per_class_metrics(labels, probs, [str(i) for i in range(k)], n_bins)
    out: dict[str, float] = {}
    for metric in PER_CLASS_METRICS:
        for i in range(k):
            value = float(report[_SOURCE[metric]][str(i)])
            if math.isfinite(value):
                out[per_class_metric(model, metric, i)] = value
    for i, row in enumerate(report["confusion_matrix"]):
        for j, count in enumerate(row):
            out[confusion_metric(model, i, j)] = float(count)
    return out


def _site_confusion(values: Mapping[str, float], model: str, k: int) -> np.ndarray | None:
    keys = [[confusion_metric(model, i, j) for j in range(k)] for i in range(k)]
    if not all(key in values for row in keys for key in row):
        return None
    return np.array([[values[key] for key in row] for row in keys], dtype=np.int64)


def pooled(per_site: Mapping[str, Mapping[str, float]], model: str, classes: Sequence[str]) -> dict[str, Any] | None:
    """Per-class table of `model` over the given sites' reports, by class name: support, F1 (from the summed
    confusion matrix), one-vs-rest AUC and classwise ECE (means over sites weighted by the class's slides there),
    the confusion matrix (rows true, columns predicted) and per site the same per class; None when no site sent
    per-class metrics."""
    k = len(classes)
    matrices = {site: m for site, v in per_site.items() if (m := _site_confusion(v, model, k)) is not None}
    if not matrices:
        return None
    total = sum(matrices.values(), np.zeros((k, k), dtype=np.int64))
    out: dict[str, Any] = {"classes": list(classes), "confusion_matrix": total.tolist(), "sites": sorted(matrices)}
    table: dict[str, dict[str, float | int | None]] = {}
    for i, name in enumerate(classes):
        tp, fp, fn = int(total[i, i]), int(total[:, i].sum() - total[i, i]), int(total[i, :].sum() - total[i, i])
        row: dict[str, float | int | None] = {
            "support": int(total[i, :].sum()),
            "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None,
        }
        for metric in ("auc", "ece"):
            num = den = 0.0
            for site, matrix in matrices.items():
                value = per_site[site].get(per_class_metric(model, metric, i))
                weight = float(matrix[i, :].sum())
                if value is not None and math.isfinite(value) and weight > 0:
                    num, den = num + value * weight, den + weight
            row[metric] = num / den if den else None
        table[name] = row
    out["per_class"] = table
    out["per_site"] = {
        site: {
            name: {metric: per_site[site].get(per_class_metric(model, metric, i)) for metric in PER_CLASS_METRICS}
            | {"support": int(matrix[i, :].sum())}
            for i, name in enumerate(classes)
        }
        for site, matrix in matrices.items()
    }
    return out


def model_tables(
    per_site: Mapping[str, Mapping[str, float]], held_out: set[str], classes: Sequence[str], models: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per model: the pooled per-class table of the training sites' test slides (`overall`) and of the
    evaluation-only sites' slides (`held_out`, when any), as `pooled` gives them."""
    parts = {
        "overall": {k: v for k, v in per_site.items() if k not in held_out},
        "held_out": {k: v for k, v in per_site.items() if k in held_out},
    }
    return {
        model: {part: table for part, values in parts.items() if (table := pooled(values, model, classes)) is not None}
        for model in models
    }


def report_lines(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown of metrics.json's per-class tables (`models[m]["per_class"]`), one table and confusion matrix per
    model and part; nothing when there are none."""
    lines: list[str] = []
    for model, parts in models.items():
        for part, table in parts.get("per_class", {}).items():
            if not lines:
                lines += ["## Per class", ""]
            names = table["classes"]
            lines += [
                f"**{model}**, {part.replace('_', '-')} slides (sites {', '.join(table['sites'])}): F1 from the summed "
                "confusion matrix; one-vs-rest AUC and classwise ECE weighted over sites by the class's slides.",
                "",
                "| class | slides | F1 | AUC (one-vs-rest) | ECE (classwise) |",
                "|---|---|---|---|---|",
            ]
            for name in names:
                row = table["per_class"][name]
                lines.append(
                    f"| {name} | {row['support']} | {_fmt(row['f1'])} | {_fmt(row['auc'])} | {_fmt(row['ece'])} |"
                )
            lines += ["", "| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            lines += [
                f"| {name} | " + " | ".join(str(v) for v in counts) + " |"
                for name, counts in zip(names, table["confusion_matrix"])
            ]
            lines.append("")
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
