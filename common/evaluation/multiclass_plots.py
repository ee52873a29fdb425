"""Report figures and tables of a subtyping (C > 2 classes) study, each figure returned as PNG bytes.

Pooled over sites, per setting: a row-normalised confusion matrix per model, one-vs-rest ROC curves per class
(one panel per class, a line per model) and a per-class table (precision, recall, F1, OvR AUC, classwise ECE;
`common.metrics.per_class_metrics`). The report adds them when the study has more than two classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from fedslide.common.evaluation.plots import SETTING_TITLES, colour, label, to_png
from fedslide.common.evaluation.predictions import PredictionTable
from fedslide.common.metrics import confusion, per_class_metrics

PER_CLASS_HEADER = ("model", "class", "slides", "precision", "recall", "F1", "AUC (OvR)", "ECE (class)")


@dataclass(frozen=True)
class Figurine:
    """One figure of the multi-class section: file name, PNG bytes and caption."""

    name: str
    png: bytes
    caption: str


def _pooled(table: PredictionTable, setting: str, model: str) -> tuple[np.ndarray, np.ndarray] | None:
    rows = table.select(setting, model)
    if not rows:
        return None
    return np.array([r.label for r in rows], dtype=np.int64), np.stack([r.probs for r in rows])


def confusion_figure(table: PredictionTable, setting: str, models: Sequence[str]) -> bytes | None:
    """Row-normalised confusion matrices (true class × predicted class, counts in the cells), one panel per model;
    None when no model has rows in `setting`."""
    panels = [(m, d) for m in models if (d := _pooled(table, setting, m)) is not None]
    if not panels:
        return None
    k = len(table.classes)
    fig = Figure(figsize=(3.4 * len(panels) + 0.6, 3.4), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (model, (y, p)) in zip(axes, panels):
        counts = confusion(y, p)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="Blues")
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{counts[i, j]}\n{share[i, j]:.0%}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black",
                )
        ax.set_xticks(range(k), table.classes, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(k), table.classes, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(label(model), fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.03, label="share of the true class")
    fig.suptitle(f"Confusion matrices, {SETTING_TITLES.get(setting, setting)}", fontsize=10)
    return to_png(fig)


def per_class_roc_figure(table: PredictionTable, setting: str, models: Sequence[str]) -> bytes | None:
    """One-vs-rest ROC curves, one panel per class, a line per model with its AUC; None without rows."""
    pooled = [(m, d) for m in models if (d := _pooled(table, setting, m)) is not None]
    if not pooled:
        return None
    k = len(table.classes)
    fig = Figure(figsize=(3.2 * k, 3.3), dpi=100)
    axes = fig.subplots(1, k, squeeze=False)[0]
    for c, ax in enumerate(axes):
        for i, (model, (y, p)) in enumerate(pooled):
            hit = y == c
            if hit.all() or not hit.any():
                continue
            fpr, tpr, _ = roc_curve(hit, p[:, c])
            ax.plot(fpr, tpr, color=colour(model), lw=1.5, label=label(model))
            auc = float(roc_auc_score(hit, p[:, c]))
            ax.text(
                0.97, 0.04 + 0.075 * i, f"AUC {auc:.3f}", transform=ax.transAxes, ha="right", fontsize=7,
                color=colour(model), weight="bold",
            )  # fmt: skip
        ax.plot([0, 1], [0, 1], ls=":", color="#999999", lw=1)
        ax.set_title(f"{table.classes[c]} vs rest", fontsize=9)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 3), fontsize=7, frameon=False)
    fig.suptitle(f"Per-class ROC (one vs rest), {SETTING_TITLES.get(setting, setting)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return to_png(fig)


def per_class_rows(table: PredictionTable, setting: str, models: Sequence[str]) -> list[list[object]]:
    """Rows of PER_CLASS_HEADER for every model with predictions in `setting` (pooled over sites)."""
    out: list[list[object]] = []
    for model in models:
        pooled = _pooled(table, setting, model)
        if pooled is None:
            continue
        report = per_class_metrics(pooled[0], pooled[1], table.classes)
        for name in report["classes"]:
            out.append(
                [
                    label(model),
                    name,
                    report["support"][name],
                    *(report[key][name] for key in ("precision", "recall", "f1", "auc_ovr", "ece")),
                ]
            )
    return out


def multiclass_figures(table: PredictionTable, models: Sequence[str]) -> list[Figurine]:
    """The confusion-matrix and per-class ROC figures of every setting with predictions (empty for C = 2)."""
    if len(table.classes) <= 2:
        return []
    out: list[Figurine] = []
    for setting, title in SETTING_TITLES.items():
        png = confusion_figure(table, setting, models)
        if png is not None:
            out.append(Figurine(f"confusion_{setting}.png", png, f"Confusion matrices pooled over sites, {title}."))
        png = per_class_roc_figure(table, setting, models)
        if png is not None:
            out.append(Figurine(f"roc_per_class_{setting}.png", png, f"One-vs-rest ROC per class, {title}."))
    return out
