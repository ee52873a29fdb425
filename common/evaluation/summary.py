"""Metrics of a study's predictions: per model, setting and site, with bootstrap CIs; gaps; transfer; paired tests.

Overall values pool the slides of all sites (LOSO convention: out-of-fold predictions of the fold
models pooled); `mean_over_sites` gives the unweighted mean of the per-site estimates beside them.
A slide scored by several fold models (in-distribution slides of LOSO runs, held-out slides of
site-local models) appears once per model: such sets, and sets where patients have several
slides, are bootstrapped by patient cluster (a patient's rows move together); other sets use the
class-stratified slide bootstrap (`common.evaluation.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from fedslide.common.evaluation.predictions import SETTINGS, PredictionTable, PredRow
from fedslide.common.evaluation.stats import Interval, bootstrap_metrics, compare_models
from fedslide.common.metrics import METRIC_NAMES


def _arrays(rows: Sequence[PredRow]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return (
        np.array([r.label for r in rows], dtype=np.int64),
        np.stack([r.probs for r in rows]),
        [r.patient for r in rows],
    )


def _groups(patients: list[str]) -> list[str] | None:
    """Patient clusters when some patient (or slide copy) repeats, else None (stratified slide bootstrap)."""
    return patients if len(set(patients)) < len(patients) else None


def _interval(iv: Interval) -> dict[str, Any]:
    return {"estimate": iv.estimate, "lo": iv.lo, "hi": iv.hi, "n_boot_valid": iv.n_boot_valid}


def metric_entry(rows: Sequence[PredRow], n_boot: int, alpha: float, seed: int, ece_bins: int) -> dict[str, Any] | None:
    """{metric: {estimate, lo, hi, n_boot_valid}, n, n_slides, n_patients, n_models, class_counts, bootstrap}."""
    if not rows:
        return None
    y, p, patients = _arrays(rows)
    groups = _groups(patients)
    intervals = bootstrap_metrics(y, p, groups=groups, n_boot=n_boot, alpha=alpha, seed=seed, ece_bins=ece_bins)
    entry: dict[str, Any] = {m: _interval(intervals[m]) for m in METRIC_NAMES}
    entry.update(
        {
            "n": len(rows),
            "n_slides": len({(r.site, r.slide_id) for r in rows}),
            "n_patients": len(set(patients)),
            "n_models": len({r.fold for r in rows}),
            "class_counts": np.bincount(y, minlength=p.shape[1]).tolist(),
            "bootstrap": "patient-cluster" if groups is not None else "stratified-slide",
        }
    )
    return entry


def _estimate(entry: dict[str, Any] | None, metric: str) -> float | None:
    if entry is None:
        return None
    value = entry[metric]["estimate"]
    return value if value is not None and math.isfinite(value) else None


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def model_section(
    table: PredictionTable,
    model: str,
    sites: Sequence[str],
    n_boot: int,
    alpha: float,
    seed: int,
    ece_bins: int,
) -> dict[str, Any]:
    """Both settings (overall, mean_over_sites, per_site) and the in-distribution minus out-of-site gap."""
    out: dict[str, Any] = {}
    for setting in SETTINGS:
        rows = table.select(setting, model)
        per_site = {s: metric_entry([r for r in rows if r.site == s], n_boot, alpha, seed, ece_bins) for s in sites}
        out[setting] = {
            "overall": metric_entry(rows, n_boot, alpha, seed, ece_bins),
            "mean_over_sites": {m: _mean([_estimate(per_site[s], m) for s in sites]) for m in METRIC_NAMES},
            "per_site": per_site,
        }
    gap: dict[str, Any] = {"overall": {}, "mean_over_sites": {}, "per_site": {s: {} for s in sites}}
    ins, outs = out["in_distribution"], out["out_of_site"]
    for m in METRIC_NAMES:
        a, b = _estimate(ins["overall"], m), _estimate(outs["overall"], m)
        gap["overall"][m] = None if a is None or b is None else a - b
        a, b = ins["mean_over_sites"][m], outs["mean_over_sites"][m]
        gap["mean_over_sites"][m] = None if a is None or b is None else a - b
        for s in sites:
            a, b = _estimate(ins["per_site"][s], m), _estimate(outs["per_site"][s], m)
            gap["per_site"][s][m] = None if a is None or b is None else a - b
    out["gap"] = gap
    return out


def transfer_matrix(table: PredictionTable, sites: Sequence[str], kind: str, metric: str = "auc") -> dict[str, Any]:
    """Site-local models: `metric` of the model trained at each source site on each target site
    (diagonal: the source's own test split; off-diagonal: the target's held-out slides)."""
    from fedslide.common.metrics import classification_metrics

    values: dict[str, dict[str, float | None]] = {}
    for source in sites:
        values[source] = {}
        for target in sites:
            setting = "in_distribution" if source == target else "out_of_site"
            rows = [r for r in table.select(setting, f"local.{kind}", target) if r.fold == f"local:{source}"]
            if not rows:
                values[source][target] = None
                continue
            y, p, _ = _arrays(rows)
            v = classification_metrics(y, p)[metric]
            values[source][target] = v if math.isfinite(v) else None
    return {"metric": metric, "rows": "source (trained at)", "columns": "target (evaluated at)", "values": values}


def _paired(rows_a: list[PredRow], rows_b: list[PredRow]) -> tuple[list[PredRow], np.ndarray] | None:
    """Rows of A and B's probabilities on the same (fold, site, slide), or None when they share none."""
    by_key = {r.key: r for r in rows_b}
    common = [r for r in rows_a if r.key in by_key]
    if not common:
        return None
    return common, np.stack([by_key[r.key].probs for r in common])


def paired_test(
    rows_a: list[PredRow],
    rows_b: list[PredRow],
    method: str,
    n_boot: int,
    seed: int,
    alpha: float,
) -> dict[str, Any]:
    """AUC of A minus AUC of B on the slides both scored (DeLong or paired bootstrap), or why it was skipped."""
    joined = _paired(rows_a, rows_b)
    if joined is None:
        return {"skipped": "the two models never scored the same slide with the same fold (nothing to pair)"}
    common, pb = joined
    y, pa, patients = _arrays(common)
    groups = _groups(patients)
    chosen = method
    if method == "delong" and (groups is not None or pa.shape[1] != 2):
        chosen = "bootstrap"  # DeLong needs independent slides and binary labels
    try:
        result = compare_models(
            y, {"a": pa, "b": pb}, groups, reference="b", method=chosen, n_boot=n_boot, seed=seed, alpha=alpha
        )["a"]
    except ValueError as exc:
        return {"skipped": str(exc), "n": len(common)}
    return {**result.to_dict(), "n": len(common), "bootstrap": "patient-cluster" if groups is not None else None}


def paired_tests(
    table: PredictionTable,
    pairs: Sequence[str],
    sites: Sequence[str],
    method: str,
    n_boot: int,
    seed: int,
    alpha: float,
) -> list[dict[str, Any]]:
    """One entry per pair, setting and site (plus "overall"): diff = AUC(a) - AUC(b)."""
    out = []
    present = set(table.models())
    for pair in pairs:
        a, b = pair.split(":")
        if a not in present or b not in present:
            continue
        for setting in SETTINGS:
            for site in [*sites, "overall"]:
                where = None if site == "overall" else site
                test = paired_test(
                    table.select(setting, a, where), table.select(setting, b, where), method, n_boot, seed, alpha
                )
                out.append({"a": a, "b": b, "setting": setting, "site": site, **test})
    return out


def summarize(
    table: PredictionTable,
    sites: Sequence[str],
    pairs: Sequence[str],
    *,
    n_boot: int,
    alpha: float,
    seed: int,
    ece_bins: int,
    paired_method: str,
    progress: bool = False,
) -> dict[str, Any]:
    """`models`, `transfer` and `paired_tests` sections of the study's metrics.json."""
    models = {}
    for model in tqdm(table.models(), desc="bootstrap", unit="model", disable=not progress, leave=False):
        models[model] = model_section(table, model, sites, n_boot, alpha, seed, ece_bins)
    transfer = {
        f"local.{k}": transfer_matrix(table, sites, k)
        for k in ("student_low", "teacher_high", "baseline_low")
        if f"local.{k}" in models
    }
    return {
        "models": models,
        "transfer": transfer,
        "paired_tests": paired_tests(table, pairs, sites, paired_method, n_boot, seed, alpha),
    }
