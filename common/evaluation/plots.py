"""Figures of the evaluation report, each returned as PNG bytes (matplotlib's object API: no global state).

ROC curves per site, reliability (calibration) diagrams, per-site metric bars with CIs, the
in-distribution vs out-of-site gap, the site-local transfer matrix, learning curves per phase and
round, bytes per phase, and the high- vs low-resolution cost.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from fedslide.common.evaluation.predictions import PredictionTable

DPI = 100
MAIN_MODELS = ("local.student_low", "federated.teacher_high", "federated.student_low", "centralized.student_low")
LABELS = {
    "local.teacher_high": "site-local teacher (high-res)",
    "local.student_low": "site-local student (low-res)",
    "local.baseline_low": "site-local low-res baseline",
    "federated.teacher_high": "federated teacher (high-res)",
    "federated.student_low": "federated student (low-res, LRMIL + D&D)",
    "federated.baseline_low": "federated low-res baseline",
    "centralized.teacher_high": "centralized teacher (high-res)",
    "centralized.student_low": "centralized student (low-res)",
    "centralized.baseline_low": "centralized low-res baseline",
}
COLOURS = {
    "local.student_low": "#7f7f7f",
    "local.teacher_high": "#bcbcbc",
    "local.baseline_low": "#d9d9d9",
    "federated.teacher_high": "#1f77b4",
    "federated.student_low": "#d62728",
    "federated.baseline_low": "#ff9896",
    "centralized.student_low": "#2ca02c",
    "centralized.teacher_high": "#98df8a",
    "centralized.baseline_low": "#c5e8b7",
}
SETTING_TITLES = {
    "in_distribution": "in-distribution (site's test split)",
    "out_of_site": "out-of-site (held-out site)",
}


def label(model: str) -> str:
    """Readable name of a model key."""
    return LABELS.get(model, model)


def colour(model: str) -> str:
    return COLOURS.get(model, "#9467bd")


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _grid(n: int, width: float = 3.2, height: float = 3.0, cols: int = 4) -> tuple[Figure, list[Any]]:
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=DPI)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _roc(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    if len(np.unique(y)) < 2:
        return None
    if p.shape[1] == 2:
        fpr, tpr, _ = roc_curve(y, p[:, 1])
    else:  # micro-average over classes (one-vs-rest)
        onehot = np.eye(p.shape[1])[y]
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
    return fpr, tpr


def _shared_legend(fig: Figure, models: Sequence[str], extra: Sequence[tuple[str, str, str]] = ()) -> None:
    """One legend for the whole figure, below the panels: a line per model (+ extra (label, colour, style))."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour(m), lw=2, label=label(m)) for m in models]
    handles += [Line2D([], [], color=c, lw=1, ls=ls, label=name) for name, c, ls in extra]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), 3),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 0.0),
    )


def roc_figure(
    table: PredictionTable, setting: str, models: Sequence[str], sites: Sequence[str], metrics: dict[str, Any]
) -> bytes:
    """ROC curves of `models` at every site and pooled, in one setting (each panel lists the AUCs)."""
    panels = [*sites, "overall"]
    fig, axes = _grid(len(panels))
    for ax, site in zip(axes, panels):
        aucs = []
        for model in models:
            rows = table.select(setting, model, None if site == "overall" else site)
            if not rows:
                continue
            y = np.array([r.label for r in rows])
            curve = _roc(y, np.stack([r.probs for r in rows]))
            if curve is None:
                continue
            entry = metrics.get(model, {}).get(setting, {})
            entry = entry.get("overall") if site == "overall" else entry.get("per_site", {}).get(site)
            auc = entry["auc"]["estimate"] if entry and entry["auc"]["estimate"] is not None else float("nan")
            ax.plot(curve[0], curve[1], color=colour(model), lw=1.5)
            aucs.append((model, auc))
        for i, (model, auc) in enumerate(reversed(aucs)):
            ax.text(
                0.97,
                0.04 + 0.075 * i,
                f"AUC {auc:.3f}",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=7,
                color=colour(model),
                weight="bold",
            )
        ax.plot([0, 1], [0, 1], ls=":", color="#999999", lw=1)
        ax.set_title("pooled over sites" if site == "overall" else site, fontsize=10)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.suptitle(f"ROC, {SETTING_TITLES.get(setting, setting)}", fontsize=11)
    fig.tight_layout(rect=(0, 0.17 if len(panels) <= 4 else 0.08, 1, 1))
    _shared_legend(fig, models)
    return to_png(fig)


def _reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted, observed frequency, count) per non-empty bin: class-1 probability if binary, else confidence."""
    if p.shape[1] == 2:
        score, hit = p[:, 1], (y == 1).astype(float)
    else:
        score, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    idx = np.clip((score * bins).astype(int), 0, bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            xs.append(score[sel].mean())
            ys.append(hit[sel].mean())
            ns.append(int(sel.sum()))
    return np.array(xs), np.array(ys), np.array(ns)


def calibration_figure(table: PredictionTable, models: Sequence[str], metrics: dict[str, Any]) -> bytes:
    """Reliability diagrams (pooled over sites) in both settings; ECE in the legend, marker area ~ slides."""
    binary = len(table.classes) == 2
    fig, axes = _grid(2, 4.2, 4.0)
    for ax, setting in zip(axes, ("in_distribution", "out_of_site")):
        eces: list[tuple[str, float]] = []
        for model in models:
            rows = table.select(setting, model)
            if not rows:
                continue
            x, y, n = _reliability(np.array([r.label for r in rows]), np.stack([r.probs for r in rows]))
            entry = metrics.get(model, {}).get(setting, {}).get("overall") or {}
            ece = (entry.get("ece") or {}).get("estimate")
            ax.plot(x, y, color=colour(model), lw=1.2)
            ax.scatter(x, y, s=12 + 60 * n / max(n.max(), 1), color=colour(model), alpha=0.7)
            if ece is not None:
                eces.append((model, ece))
        for i, (model, ece) in enumerate(reversed(eces)):
            ax.text(
                0.97,
                0.04 + 0.07 * i,
                f"ECE {ece:.3f}",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=7,
                color=colour(model),
                weight="bold",
            )
        ax.plot([0, 1], [0, 1], ls=":", color="#999999", lw=1)
        ax.set_xlabel(f"predicted P({table.classes[1]})" if binary else "confidence (max probability)", fontsize=8)
        ax.set_ylabel(f"observed fraction {table.classes[1]}" if binary else "accuracy", fontsize=8)
        ax.set_title(SETTING_TITLES[setting], fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    _shared_legend(fig, models, [("perfect calibration", "#999999", ":")])
    return to_png(fig)


def _value(entry: dict[str, Any] | None, metric: str) -> tuple[float, float, float]:
    if not entry or entry.get(metric) is None:
        return math.nan, math.nan, math.nan
    iv = entry[metric]
    return tuple(math.nan if iv.get(k) is None else float(iv[k]) for k in ("estimate", "lo", "hi"))  # type: ignore[return-value]


def site_bars_figure(
    metrics: dict[str, Any], models: Sequence[str], sites: Sequence[str], metric: str = "auc"
) -> bytes:
    """Per-site `metric` with 95 % CI whiskers, one panel per setting."""
    fig, axes = _grid(2, 1.2 + 1.1 * (len(sites) + 1), 3.2, cols=1)
    panels = [*sites, "overall"]
    width = 0.8 / max(len(models), 1)
    for ax, setting in zip(axes, ("in_distribution", "out_of_site")):
        for i, model in enumerate(models):
            section = metrics.get(model, {}).get(setting, {})
            values = [
                _value(section.get("overall") if s == "overall" else section.get("per_site", {}).get(s), metric)
                for s in panels
            ]
            est = np.array([v[0] for v in values])
            err = np.array(
                [
                    [max(v[0] - v[1], 0) if math.isfinite(v[1]) else 0 for v in values],
                    [max(v[2] - v[0], 0) if math.isfinite(v[2]) else 0 for v in values],
                ]
            )
            xs = np.arange(len(panels)) + (i - (len(models) - 1) / 2) * width
            ax.bar(xs, np.nan_to_num(est), width, color=colour(model), yerr=err, capsize=2, error_kw={"lw": 0.8})
        ax.set_xticks(np.arange(len(panels)), [*sites, "pooled"], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(metric, fontsize=8)
        ax.set_title(SETTING_TITLES[setting], fontsize=10)
        ax.tick_params(labelsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _shared_legend(fig, models)
    return to_png(fig)


def gap_figure(metrics: dict[str, Any], models: Sequence[str], metric: str = "auc") -> bytes:
    """In-distribution vs out-of-site `metric` (pooled, with CIs) per model: the generalisation gap."""
    fig = Figure(figsize=(6.4, 0.6 + 0.55 * len(models)), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    for row, model in enumerate(models):
        section = metrics.get(model, {})
        ins = _value(section.get("in_distribution", {}).get("overall"), metric)
        out = _value(section.get("out_of_site", {}).get("overall"), metric)
        y = len(models) - 1 - row
        if math.isfinite(ins[0]) and math.isfinite(out[0]):
            ax.plot([out[0], ins[0]], [y, y], color=colour(model), lw=2, alpha=0.6)
        for (est, lo, hi), marker, name in ((ins, "o", "in-distribution"), (out, "s", "out-of-site")):
            if math.isfinite(est):
                xerr = [[est - lo], [hi - est]] if math.isfinite(lo) and math.isfinite(hi) else None
                ax.errorbar(
                    [est],
                    [y],
                    xerr=xerr,
                    fmt=marker,
                    color=colour(model),
                    ms=6,
                    capsize=2,
                    lw=0.8,
                    mfc="white" if marker == "s" else colour(model),
                    label=name if row == 0 else None,
                )
    ax.set_yticks(range(len(models)), [label(m) for m in reversed(models)], fontsize=8)
    ax.set_xlabel(f"{metric} (pooled over sites, 95 % CI)", fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("in-distribution (filled) vs out-of-site (open)", fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def transfer_figure(transfer: dict[str, Any], title: str) -> bytes:
    """Source x target matrix of a site-local model's metric."""
    values = transfer["values"]
    sites = list(values)
    grid = np.array([[np.nan if values[s][t] is None else values[s][t] for t in sites] for s in sites], dtype=float)
    fig = Figure(figsize=(1.6 + 0.9 * len(sites), 1.2 + 0.8 * len(sites)), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0.5, vmax=1.0)
    for i in range(len(sites)):
        for j in range(len(sites)):
            text = "n/a" if not math.isfinite(grid[i, j]) else f"{grid[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, weight="bold" if i == j else "normal")
    ax.set_xticks(range(len(sites)), sites, fontsize=8)
    ax.set_yticks(range(len(sites)), sites, fontsize=8)
    ax.set_xlabel("evaluated at", fontsize=8)
    ax.set_ylabel("trained at", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046).set_label(transfer.get("metric", "auc"), fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def model_curves(curves: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[int, float]]]:
    """Validation loss per round of each model a federation trained: `val_loss` names its phase's model,
    `val_loss_<name>` a model that shares the phase's messages (the baseline in the teacher phase), and
    `val_loss_<c>` the experts, averaged."""
    out: dict[str, list[tuple[int, float]]] = {}
    for phase, history in curves.items():
        panels: dict[str, list[str]] = {}
        for key in sorted({k for h in history for k in h if k.startswith("val_loss")}):
            name = key.removeprefix("val_loss").lstrip("_")
            panels.setdefault(name if name and not name.isdigit() else phase, []).append(key)
        for panel, keys in panels.items():
            pts = []
            for h in history:
                values = [h[k] for k in keys if h.get(k) is not None]
                if values:
                    pts.append((int(h["round"]), float(np.mean(values))))
            out[panel] = pts
    return out


def learning_curves_figure(federation: dict[str, Any]) -> bytes | None:
    """Validation loss per round of every federated model (experts averaged), one line per federation (fold)."""
    folds = {held: model_curves(fold.get("learning_curves", {})) for held, fold in federation.items()}
    panels: list[str] = []
    for curves in folds.values():
        panels.extend(p for p in curves if p not in panels)
    if not panels:
        return None
    fig, axes = _grid(len(panels), 3.0, 2.6)
    for ax, panel in zip(axes, panels):
        for held, curves in folds.items():
            pts = curves.get(panel, [])
            if pts:
                ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", ms=3, lw=1.2, label=f"without {held}")
        ax.set_title(panel if panel != "experts" else "experts (mean)", fontsize=10)
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylabel("validation loss", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return to_png(fig)


def communication_figure(per_phase: dict[str, dict[str, float]]) -> bytes | None:
    """Bytes down (server -> sites) and up (sites -> server) per phase, log scale."""
    if not per_phase:
        return None
    phases = list(per_phase)
    fig = Figure(figsize=(1.5 + 0.8 * len(phases), 3.2), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(phases))
    down = [max(per_phase[p].get("down", 0), 1) for p in phases]
    up = [max(per_phase[p].get("up", 0), 1) for p in phases]
    ax.bar(x - 0.2, down, 0.4, label="down (to sites)", color="#1f77b4")
    ax.bar(x + 0.2, up, 0.4, label="up (from sites)", color="#ff7f0e")
    ax.set_yscale("log")
    ax.set_xticks(x, phases, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("bytes per federation", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return to_png(fig)


def cost_figure(cost: dict[str, Any]) -> bytes | None:
    """Patches and model seconds per slide at high vs low resolution."""
    sources = [(name, cost[name]) for name in ("measured", "federated") if name in cost]
    if not sources:
        return None
    fig, axes = _grid(2, 3.4, 2.8, cols=2)
    for ax, key, unit in zip(axes, ("patches_per_slide", "seconds_per_slide"), ("patches / slide", "model s / slide")):
        width = 0.8 / len(sources)
        for i, (name, entry) in enumerate(sources):
            vals = [entry.get(res, {}).get(key) or 0.0 for res in ("high", "low")]
            ax.bar(
                np.arange(2) + (i - (len(sources) - 1) / 2) * width,
                vals,
                width,
                label=name,
                color=["#1f77b4", "#d62728"][i % 2],
                alpha=0.85,
            )
        ax.set_xticks([0, 1], ["high-res (teacher)", "low-res (student)"], fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return to_png(fig)
