"""Confidence intervals and paired tests for the slide-level metrics of `common.metrics`.

Conventions (shared with `common.metrics`): integer labels `y_true` [n] in 0..C-1 and class
probabilities `probs` [n, C]; the metric names are those of `METRIC_NAMES`
(auc, acc, balanced_acc, f1, brier, ece). NaN marks a value that is undefined or not reported.

Resampling (`bootstrap_metrics`, `paired_bootstrap_auc`):
- without `groups`: slides are resampled with replacement *within each class* (stratified
  bootstrap), so every resample keeps the class counts of the data and AUC stays defined;
- with `groups` (e.g. patient ids): whole groups are resampled with replacement (cluster
  bootstrap, not stratified), so slides of one patient enter or leave together. A resample may
  then lack a class; metrics undefined on it (AUC) are dropped and counted. A group id of None
  puts that slide in a group of its own.
Intervals are percentile intervals of the valid resamples. When fewer than `min_valid_frac` of
the `n_boot` resamples give a finite value, the interval is (NaN, NaN): too few to say.
Everything is deterministic given `seed` (one `np.random.default_rng(seed)` per call).

AUC on resamples is computed exactly (the Mann-Whitney statistic, ties counting 1/2, as
scikit-learn's `roc_auc_score` and `common.metrics.roc_auc` do; multi-class: mean one-vs-rest
AUC over the classes present) from per-slide resampling weights, vectorised over resamples;
the other metrics call `common.metrics` on each resample.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from fedslide.common.metrics import (
    DEFAULT_ECE_BINS,
    METRIC_NAMES,
    brier,
    classification_metrics,
    expected_calibration_error,
    f1,
    roc_auc,
)

_CHUNK = 256  # resamples drawn and evaluated at a time (bounds memory to _CHUNK x n weights)
_FLOATS_PER_BLOCK = 4_000_000  # size of the weight blocks in the vectorised AUC


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval; lo/hi NaN when not reportable."""

    estimate: float
    lo: float
    hi: float
    n_boot_valid: int
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (NaN kept; `common.training.outputs.json_safe` turns it into null)."""
        return asdict(self)


@dataclass(frozen=True)
class PairedTest:
    """Paired comparison of two models' AUC on the same slides: diff = auc_a - auc_b.

    lo/hi: (1 - alpha) interval of diff; se: its standard error (DeLong) or bootstrap SD;
    p_value: two-sided, for H0 diff = 0; n_boot_valid: None for DeLong.
    """

    auc_a: float
    auc_b: float
    diff: float
    lo: float
    hi: float
    p_value: float
    se: float
    alpha: float
    method: str
    n_boot_valid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (NaN kept; `common.training.outputs.json_safe` turns it into null)."""
        return asdict(self)


# ----------------------------------------------------------------------------- input checks


def _labels(y_true: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D [n], got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty: no slides to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise ValueError(f"y_true must hold integer class labels, got dtype {y.dtype}")
    return y.astype(np.int64)


def _probs(y: np.ndarray, probs: np.ndarray, name: str = "probs", allow_1d: bool = False) -> np.ndarray:
    """[n, C] float array; a 1-D array (if allowed) is the class-1 score of a binary problem."""
    p = np.asarray(probs, dtype=np.float64)
    if allow_1d and p.ndim == 1 and p.shape[0] == y.shape[0]:
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] < 2:
        want = "[n, C>=2]" + (" or [n]" if allow_1d else "")
        raise ValueError(f"{name} must be {want} with n = len(y_true) = {y.shape[0]}, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(
            f"labels must lie in 0..{p.shape[1] - 1} for {name} of shape {p.shape}, got {sorted(set(y.tolist()))}"
        )
    return p


def _group_codes(groups: Sequence[Hashable | None] | np.ndarray, n: int) -> np.ndarray:
    """Integer cluster code per slide; None (or NaN) ids become singleton clusters."""
    g = list(groups.tolist() if isinstance(groups, np.ndarray) else groups)
    if len(g) != n:
        raise ValueError(f"groups must have one id per slide: len(groups) = {len(g)}, len(y_true) = {n}")
    codes: dict[Hashable, int] = {}
    out = np.empty(n, dtype=np.int64)
    for i, gid in enumerate(g):
        if gid is None or (isinstance(gid, float) and math.isnan(gid)):
            gid = ("__own_group__", i)
        out[i] = codes.setdefault(gid, len(codes))
    return out


def _check_common(n_boot: int, alpha: float, min_valid_frac: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not 0.0 <= min_valid_frac <= 1.0:
        raise ValueError(f"min_valid_frac must lie in [0, 1], got {min_valid_frac}")


# ----------------------------------------------------------------------------- resampling


def _resample_counts(y: np.ndarray, codes: np.ndarray | None, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, n] multiplicity of each slide in each resample (stratified, or by cluster)."""
    n = y.shape[0]
    if codes is None:
        counts = np.zeros((size, n), dtype=np.int64)
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            counts[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=size)
        return counts
    n_groups = int(codes.max()) + 1
    group_counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=size)
    return group_counts[:, codes]


def _chunks(y: np.ndarray, codes: np.ndarray | None, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Slide counts of all `n_boot` resamples, _CHUNK resamples at a time."""
    for start in range(0, n_boot, _CHUNK):
        yield _resample_counts(y, codes, min(_CHUNK, n_boot - start), rng)


def _weighted_binary_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties 1/2) of each row of slide weights [B, n]; NaN where a class has no weight."""
    values, inv = np.unique(scores, return_inverse=True)
    k = values.size
    n_rows, n = weights.shape
    out = np.empty(n_rows, dtype=np.float64)
    step = max(1, _FLOATS_PER_BLOCK // max(n, k))
    pos_inv, neg_inv = inv[positive], inv[~positive]
    for start in range(0, n_rows, step):
        w = weights[start : start + step].astype(np.float64)
        b = w.shape[0]
        offset = (np.arange(b) * k)[:, None]
        pos = np.bincount((offset + pos_inv).ravel(), weights=w[:, positive].ravel(), minlength=b * k).reshape(b, k)
        neg = np.bincount((offset + neg_inv).ravel(), weights=w[:, ~positive].ravel(), minlength=b * k).reshape(b, k)
        below = np.cumsum(neg, axis=1) - neg
        num = (pos * (below + 0.5 * neg)).sum(axis=1)
        den = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + b] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _weighted_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`common.metrics.roc_auc` of each resample given as slide weights [B, n]."""
    if p.shape[1] == 2:
        return _weighted_binary_auc(y == 1, p[:, 1], weights)
    per_class, present = [], []
    for c in range(p.shape[1]):
        is_c = y == c
        present.append(weights[:, is_c].sum(axis=1) > 0)
        if is_c.any():
            per_class.append(_weighted_binary_auc(is_c, p[:, c], weights))
        else:
            per_class.append(np.full(weights.shape[0], np.nan))
    present_arr = np.stack(present, axis=1)
    aucs = np.where(present_arr, np.stack(per_class, axis=1), 0.0)
    n_present = present_arr.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_present >= 2, aucs.sum(axis=1) / np.maximum(n_present, 1), np.nan)


def _metric_values(y: np.ndarray, p: np.ndarray, names: Sequence[str], ece_bins: int) -> dict[str, float]:
    """The named metrics of `common.metrics` on one set of slides."""
    if "acc" in names or "balanced_acc" in names:
        full = classification_metrics(y, p, n_bins=ece_bins)
        return {name: full[name] for name in names}
    single = {"auc": roc_auc, "f1": f1, "brier": brier}
    return {
        name: expected_calibration_error(y, p, n_bins=ece_bins) if name == "ece" else single[name](y, p)
        for name in names
    }


def _percentile_interval(
    values: np.ndarray, n_boot: int, alpha: float, min_valid_frac: float
) -> tuple[float, float, int]:
    finite = values[np.isfinite(values)]
    n_valid = int(finite.size)
    if n_valid == 0 or n_valid < min_valid_frac * n_boot:
        return math.nan, math.nan, n_valid
    lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi), n_valid


# ----------------------------------------------------------------------------- public API


def bootstrap_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    groups: Sequence[Hashable | None] | np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    ece_bins: int = DEFAULT_ECE_BINS,
    metrics: Sequence[str] | None = None,
    min_valid_frac: float = 0.5,
) -> dict[str, Interval]:
    """Each metric on all slides with its (1 - alpha) percentile bootstrap interval.

    Stratified slide bootstrap without `groups`, cluster bootstrap over groups with them (module
    doc). Resamples where a metric is NaN are dropped and counted in `n_boot_valid`; below
    `min_valid_frac * n_boot` valid resamples the interval is (NaN, NaN).
    """
    y = _labels(y_true)
    p = _probs(y, probs)
    _check_common(n_boot, alpha, min_valid_frac)
    names = list(METRIC_NAMES if metrics is None else metrics)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(f"metrics must be a non-empty subset of {list(METRIC_NAMES)}, got {names}")
    codes = None if groups is None else _group_codes(groups, y.shape[0])
    rng = np.random.default_rng(seed)

    estimate = _metric_values(y, p, names, ece_bins)
    others = [m for m in names if m != "auc"]
    boot: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for counts in _chunks(y, codes, int(n_boot), rng):
        if "auc" in names:
            boot["auc"].append(_weighted_auc(y, p, counts))
        if others:
            values = _weighted_other_metrics(y, p, counts, others, ece_bins)
            for m in others:
                boot[m].append(values[m])

    out: dict[str, Interval] = {}
    for m in names:
        lo, hi, n_valid = _percentile_interval(np.concatenate(boot[m]), int(n_boot), alpha, min_valid_frac)
        out[m] = Interval(estimate=float(estimate[m]), lo=lo, hi=hi, n_boot_valid=n_valid, n_boot=int(n_boot))
    return out


def paired_bootstrap_auc(
    y_true: Sequence[int] | np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    groups: Sequence[Hashable | None] | np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    min_valid_frac: float = 0.5,
) -> PairedTest:
    """Paired bootstrap of auc_a - auc_b: both models scored on the same resamples.

    probs_*: [n, C] probabilities, or [n] class-1 scores for binary labels. Interval: percentile
    interval of the bootstrap differences d. p_value = min(1, 2 * min(#(d <= 0) + 1,
    #(d >= 0) + 1) / (n_valid + 1)): two-sided, from where 0 lies in the bootstrap distribution
    of d (the +1 keeps it from reading 0 on a finite number of resamples; identical models give
    1). Below `min_valid_frac * n_boot` valid resamples lo, hi, p_value and se are NaN.
    """
    y = _labels(y_true)
    pa = _probs(y, probs_a, "probs_a", allow_1d=True)
    pb = _probs(y, probs_b, "probs_b", allow_1d=True)
    if pa.shape != pb.shape:
        raise ValueError(f"probs_a and probs_b must have the same shape, got {pa.shape} and {pb.shape}")
    _check_common(n_boot, alpha, min_valid_frac)
    codes = None if groups is None else _group_codes(groups, y.shape[0])
    rng = np.random.default_rng(seed)

    auc_a, auc_b = roc_auc(y, pa), roc_auc(y, pb)
    diffs = np.concatenate(
        [_weighted_auc(y, pa, c) - _weighted_auc(y, pb, c) for c in _chunks(y, codes, int(n_boot), rng)]
    )
    lo, hi, n_valid = _percentile_interval(diffs, int(n_boot), alpha, min_valid_frac)
    d = diffs[np.isfinite(diffs)]
    if math.isnan(lo):
        p_value = se = math.nan
    else:
        tail = min(np.count_nonzero(d <= 0.0), np.count_nonzero(d >= 0.0)) + 1
        p_value = float(min(1.0, 2.0 * tail / (n_valid + 1)))
        se = float(d.std(ddof=1)) if n_valid > 1 else math.nan
    return PairedTest(
        auc_a=auc_a,
        auc_b=auc_b,
        diff=auc_a - auc_b,
        lo=lo,
        hi=hi,
        p_value=p_value,
        se=se,
        alpha=float(alpha),
        method="bootstrap",
        n_boot_valid=n_valid,
    )


def _binary_scores(y: np.ndarray, scores: np.ndarray, name: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    elif s.ndim == 2 and s.shape[1] > 2:
        raise ValueError(f"delong_test is binary-only: {name} has shape {s.shape} (multi-class probabilities)")
    if s.ndim != 1 or s.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name} must be [n] scores or [n, 2] probabilities with n = len(y_true) = {y.shape[0]}, "
            f"got shape {s.shape}"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def _delong_auc_cov(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [k] and their DeLong covariance [k, k] for scores [k, n] (midrank algorithm of Sun & Xu 2014)."""
    positive = y == 1
    x, z = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], z.shape[1]
    tx = rankdata(x, axis=1)  # midranks within positives
    tz = rankdata(z, axis=1)  # midranks within negatives
    t_all = rankdata(np.concatenate([x, z], axis=1), axis=1)  # midranks in the pooled sample
    aucs = (t_all[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (t_all[:, :m] - tx) / n  # structural components of the positives: mean_j psi(x_i, z_j)
    v01 = 1.0 - (t_all[:, m:] - tz) / m  # of the negatives: mean_i psi(x_i, z_j)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(
    y_true: Sequence[int] | np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, alpha: float = 0.05
) -> PairedTest:
    """DeLong et al. (1988) test of auc_a = auc_b for two scores on the same binary-labelled slides.

    Labels 0/1, at least two slides of each; scores [n] (class-1 score) or [n, 2] probabilities
    (column 1 used). Interval: diff -/+ z_{1-alpha/2} * se with se from the DeLong covariance;
    p_value: two-sided normal. Slides are taken as independent (no patient grouping). If the
    estimated variance of diff is 0, p_value is 1 when diff = 0 and 0 otherwise.
    """
    y = _labels(y_true)
    present = sorted(set(np.unique(y).tolist()))
    if not set(present) <= {0, 1}:
        raise ValueError(f"delong_test is binary-only: labels must be 0/1, got labels {present}")
    if len(present) < 2:
        raise ValueError(f"delong_test needs both classes: only label {present[0]} present, AUC undefined")
    counts = np.bincount(y, minlength=2)
    if counts.min() < 2:
        raise ValueError(
            f"delong_test needs at least 2 slides of each class, got {counts[0]} negative and {counts[1]} positive"
        )
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    a = _binary_scores(y, scores_a, "scores_a")
    b = _binary_scores(y, scores_b, "scores_b")
    aucs, cov = _delong_auc_cov(y, np.stack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(var) if var > 0.0 else 0.0
    if se > 0.0:
        p_value = float(2.0 * norm.sf(abs(diff) / se))
    else:
        p_value = 1.0 if diff == 0.0 else 0.0
    half = float(norm.ppf(1.0 - alpha / 2.0)) * se
    return PairedTest(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        diff=diff,
        lo=diff - half,
        hi=diff + half,
        p_value=p_value,
        se=se,
        alpha=float(alpha),
        method="delong",
        n_boot_valid=None,
    )


def compare_models(
    y_true: Sequence[int] | np.ndarray,
    probs_by_model: Mapping[str, np.ndarray],
    groups: Sequence[Hashable | None] | np.ndarray | None = None,
    *,
    reference: str,
    method: str = "auto",
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, PairedTest]:
    """Paired AUC test of every model against `reference` (diff = model - reference).

    method: "delong", "bootstrap", or "auto" = DeLong for binary labels without groups, else the
    paired (cluster) bootstrap. DeLong ignores grouping, so it is refused when groups are given.
    """
    if reference not in probs_by_model:
        raise ValueError(f"reference {reference!r} is not among the models {sorted(probs_by_model)}")
    if method not in ("auto", "delong", "bootstrap"):
        raise ValueError(f"method must be 'auto', 'delong' or 'bootstrap', got {method!r}")
    y = _labels(y_true)
    ref = np.asarray(probs_by_model[reference])
    if method == "auto":
        binary = set(np.unique(y).tolist()) <= {0, 1} and (ref.ndim == 1 or (ref.ndim == 2 and ref.shape[1] == 2))
        method = "delong" if binary and groups is None else "bootstrap"
    if method == "delong" and groups is not None:
        raise ValueError("delong_test treats slides as independent; use method='bootstrap' with groups")
    out: dict[str, PairedTest] = {}
    for name, probs in probs_by_model.items():
        if name == reference:
            continue
        if method == "delong":
            out[name] = delong_test(y, probs, ref, alpha=alpha)
        else:
            out[name] = paired_bootstrap_auc(y, probs, ref, groups=groups, n_boot=n_boot, seed=seed, alpha=alpha)
    return out


def _weighted_other_metrics(
    y: np.ndarray, p: np.ndarray, weights: np.ndarray, names: Sequence[str], ece_bins: int
) -> dict[str, np.ndarray]:
    """acc, balanced_acc, f1, brier, ece of every resample at once: resample r counts slide i weights[r, i] times.

    Vectorised equivalents of common.metrics (same definitions; a test checks they agree).
    """
    w = weights.astype(np.float64)
    total = w.sum(1)
    k = p.shape[1]
    pred = p.argmax(1)
    correct = (pred == y).astype(np.float64)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if "acc" in names:
            out["acc"] = (w @ correct) / total
        if "balanced_acc" in names or "f1" in names:
            tp = np.stack([w @ ((y == c) & (pred == c)) for c in range(k)], 1)
            support = np.stack([w @ (y == c) for c in range(k)], 1)
            predicted = np.stack([w @ (pred == c) for c in range(k)], 1)
            if "balanced_acc" in names:
                present = support > 0
                recall = np.where(present, tp / np.where(present, support, 1), 0.0)
                out["balanced_acc"] = recall.sum(1) / present.sum(1)
            if "f1" in names:
                denom = support + predicted
                f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
                out["f1"] = f1[:, 1] if k == 2 else f1.mean(1)
        if "brier" in names:
            err = (p[:, 1] - (y == 1)) ** 2 if k == 2 else ((p - np.eye(k)[y]) ** 2).sum(1)
            out["brier"] = (w @ err) / total
        if "ece" in names:
            conf = p.max(1)
            bins = np.clip(np.ceil(conf * ece_bins).astype(int) - 1, 0, ece_bins - 1)
            gaps = [
                np.abs(w[:, bins == b] @ correct[bins == b] - w[:, bins == b] @ conf[bins == b])
                for b in np.unique(bins)
            ]
            out["ece"] = np.sum(gaps, axis=0) / total
    return out
