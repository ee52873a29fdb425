"""Bootstrap intervals, cluster bootstrap, paired AUC tests (bootstrap and DeLong) and ECE."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from fedslide.common.evaluation.stats import (
    Interval,
    PairedTest,
    _delong_auc_cov,
    _resample_counts,
    _weighted_auc,
    bootstrap_metrics,
    compare_models,
    delong_test,
    paired_bootstrap_auc,
)
from fedslide.common.metrics import METRIC_NAMES, classification_metrics, expected_calibration_error, roc_auc


def _two_col(p1: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - p1, p1], axis=1)


def _binormal(rng: np.random.Generator, n_neg: int, n_pos: int, d: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and class-1 scores: N(0, 1) negatives, N(d, 1) positives (true AUC = Phi(d / sqrt 2))."""
    y = np.r_[np.zeros(n_neg, dtype=np.int64), np.ones(n_pos, dtype=np.int64)]
    return y, rng.normal(size=y.size) + d * y


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- bootstrap_metrics


def test_auc_interval_covers_true_auc_at_nominal_rate() -> None:
    d = 1.0
    true_auc = float(norm.cdf(d / math.sqrt(2.0)))  # 0.760
    rng = np.random.default_rng(2024)
    covered, widths, estimates = [], [], []
    for i in range(300):
        y, s = _binormal(rng, 40, 40, d)
        iv = bootstrap_metrics(y, _two_col(_sigmoid(s)), n_boot=200, seed=i, metrics=["auc"])["auc"]
        assert iv.n_boot_valid == 200
        covered.append(iv.lo <= true_auc <= iv.hi)
        widths.append(iv.hi - iv.lo)
        estimates.append(iv.estimate)
    coverage = float(np.mean(covered))
    assert 0.90 <= coverage <= 0.99, coverage
    # not covering by being uselessly wide: width ~ 2 * 1.96 * (true sampling SD of the AUC)
    ratio = float(np.mean(widths)) / (2 * 1.96 * float(np.std(estimates, ddof=1)))
    assert 0.90 <= ratio <= 1.15, ratio  # a 90 % (0.87) or 98 % (1.18) interval fails here
    assert abs(float(np.mean(estimates)) - true_auc) < 0.01


def test_estimates_match_classification_metrics_and_intervals_bracket_them() -> None:
    rng = np.random.default_rng(0)
    y, s = _binormal(rng, 30, 20, 1.2)
    p = _two_col(_sigmoid(s))
    out = bootstrap_metrics(y, p, n_boot=60, seed=3, ece_bins=10)
    assert list(out) == list(METRIC_NAMES)
    ref = classification_metrics(y, p, n_bins=10)
    for name, iv in out.items():
        assert isinstance(iv, Interval)
        assert iv.estimate == pytest.approx(ref[name], abs=1e-12), name
        assert iv.n_boot == 60 and iv.n_boot_valid == 60
        assert iv.lo <= iv.hi
        assert iv.lo - 1e-9 <= iv.estimate <= iv.hi + 1e-9 or name == "ece", (name, iv)  # ECE is biased upwards
    assert out["ece"].estimate == pytest.approx(expected_calibration_error(y, p, n_bins=10))
    assert out["ece"].estimate != pytest.approx(expected_calibration_error(y, p, n_bins=15))
    assert set(out["auc"].to_dict()) == {"estimate", "lo", "hi", "n_boot_valid", "n_boot"}


def test_deterministic_given_seed() -> None:
    rng = np.random.default_rng(1)
    y, s = _binormal(rng, 25, 25, 0.8)
    p = _two_col(_sigmoid(s))
    a = bootstrap_metrics(y, p, n_boot=300, seed=7, metrics=["auc"])
    b = bootstrap_metrics(y, p, n_boot=300, seed=7, metrics=["auc"])
    c = bootstrap_metrics(y, p, n_boot=300, seed=8, metrics=["auc"])
    assert a == b
    assert a != c


def test_stratified_resamples_keep_class_counts() -> None:
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    counts = _resample_counts(y, None, 100, np.random.default_rng(0))
    for c, n_c in ((0, 7), (1, 3), (2, 5)):
        assert np.all(counts[:, y == c].sum(axis=1) == n_c)


def test_vectorised_auc_equals_roc_auc_on_resamples() -> None:
    rng = np.random.default_rng(5)
    n = 60
    # binary, with many ties, stratified resamples
    y = rng.integers(0, 2, n)
    p = _two_col(np.round(rng.uniform(size=n), 1))
    w = _resample_counts(y, None, 40, rng)
    ref = [roc_auc(y[idx], p[idx]) for idx in (np.repeat(np.arange(n), row) for row in w)]
    np.testing.assert_allclose(_weighted_auc(y, p, w), ref, rtol=0, atol=1e-12)
    # multi-class, cluster resamples over few groups so that classes go missing
    y3 = np.repeat(np.array([0, 1, 2, 0, 1, 2]), 10)
    p3 = rng.dirichlet(np.ones(3), size=y3.size)
    w3 = _resample_counts(y3, np.repeat(np.arange(6), 10), 200, rng)
    ref3 = np.array([roc_auc(y3[idx], p3[idx]) for idx in (np.repeat(np.arange(y3.size), row) for row in w3)])
    got3 = _weighted_auc(y3, p3, w3)
    assert np.array_equal(np.isnan(got3), np.isnan(ref3))
    assert np.isnan(ref3).any()  # some resamples hold one class only
    present = np.array([np.unique(y3[w3[b] > 0]).size for b in range(w3.shape[0])])
    assert (present == 2).any()  # and some hold 2 of the 3 classes (mean over the present ones)
    np.testing.assert_allclose(got3[~np.isnan(ref3)], ref3[~np.isnan(ref3)], rtol=0, atol=1e-12)


def test_cluster_bootstrap_wider_with_duplicated_patients() -> None:
    rng = np.random.default_rng(11)
    y_pat, s_pat = _binormal(rng, 20, 20, 1.0)  # 40 patients, each of one class
    copies = 3
    y = np.repeat(y_pat, copies)
    p = _two_col(_sigmoid(np.repeat(s_pat, copies)))  # each patient's slides identical
    patients = np.repeat([f"P{i:02d}" for i in range(y_pat.size)], copies)

    naive = bootstrap_metrics(y, p, n_boot=1000, seed=0, metrics=["auc"])["auc"]
    grouped = bootstrap_metrics(y, p, groups=patients, n_boot=1000, seed=0, metrics=["auc"])["auc"]
    once = bootstrap_metrics(y_pat, _two_col(_sigmoid(s_pat)), n_boot=1000, seed=0, metrics=["auc"])["auc"]
    assert grouped.estimate == pytest.approx(naive.estimate)
    w_naive, w_grouped, w_once = (iv.hi - iv.lo for iv in (naive, grouped, once))
    assert w_grouped > 1.3 * w_naive, (w_grouped, w_naive)  # ~ sqrt(3) for 3 copies
    assert 0.75 < w_grouped / w_once < 1.33, (w_grouped, w_once)  # duplicates add no information
    assert grouped.n_boot_valid == 1000  # 20 patients per class: every resample has both classes


def test_single_class_groups_count_undefined_resamples() -> None:
    # 5 patients of 4 slides each, only one of them positive: a resample misses it w.p. (4/5)^5
    y = np.repeat([0, 0, 0, 0, 1], 4)
    rng = np.random.default_rng(2)
    p = _two_col(np.clip(0.3 + 0.4 * y + 0.1 * rng.normal(size=y.size), 0.01, 0.99))
    groups = np.repeat(np.arange(5), 4)
    out = bootstrap_metrics(y, p, groups=groups, n_boot=400, seed=0, metrics=["auc", "brier"])
    expected_valid = 1 - (4 / 5) ** 5  # 0.672
    assert abs(out["auc"].n_boot_valid / 400 - expected_valid) < 0.08
    assert math.isfinite(out["auc"].lo) and math.isfinite(out["auc"].hi)
    assert out["brier"].n_boot_valid == 400
    strict = bootstrap_metrics(y, p, groups=groups, n_boot=400, seed=0, metrics=["auc"], min_valid_frac=0.9)
    assert strict["auc"].n_boot_valid == out["auc"].n_boot_valid
    assert math.isnan(strict["auc"].lo) and math.isnan(strict["auc"].hi)
    assert strict["auc"].estimate == pytest.approx(out["auc"].estimate)


def test_one_class_only_gives_nan_auc_interval_not_an_error() -> None:
    y = np.zeros(12, dtype=np.int64)
    p = _two_col(np.linspace(0.05, 0.6, 12))
    for groups in (None, np.repeat(np.arange(4), 3)):
        out = bootstrap_metrics(y, p, groups=groups, n_boot=30, seed=0, metrics=["auc", "acc"])
        assert math.isnan(out["auc"].estimate) and math.isnan(out["auc"].lo) and math.isnan(out["auc"].hi)
        assert out["auc"].n_boot_valid == 0
        assert out["acc"].n_boot_valid == 30 and math.isfinite(out["acc"].lo)


def test_missing_group_ids_are_singleton_groups() -> None:
    rng = np.random.default_rng(3)
    y, s = _binormal(rng, 15, 15, 1.0)
    p = _two_col(_sigmoid(s))
    a = bootstrap_metrics(y, p, groups=[None] * y.size, n_boot=200, seed=1, metrics=["auc"])
    b = bootstrap_metrics(y, p, groups=list(range(y.size)), n_boot=200, seed=1, metrics=["auc"])
    assert a == b


def test_bad_inputs_raise_value_errors_naming_shapes() -> None:
    y = np.array([0, 1, 0, 1])
    p = _two_col(np.array([0.2, 0.7, 0.4, 0.9]))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        bootstrap_metrics(y, p[:3])
    with pytest.raises(ValueError, match=r"\(4,\)"):
        bootstrap_metrics(y, p[:, 1])
    with pytest.raises(ValueError, match="len\\(groups\\) = 3"):
        bootstrap_metrics(y, p, groups=[1, 2, 3])
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        bootstrap_metrics(np.array([0, 1, 2, 1]), p)
    with pytest.raises(ValueError, match="subset"):
        bootstrap_metrics(y, p, metrics=["auroc"])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_metrics(y, p, n_boot=0)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        paired_bootstrap_auc(y, p, np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        delong_test(y, p[:, 1], np.ones(5))


# ----------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_identical_models() -> None:
    rng = np.random.default_rng(4)
    y, s = _binormal(rng, 30, 30, 1.0)
    t = paired_bootstrap_auc(y, s, s, n_boot=500)
    assert isinstance(t, PairedTest) and t.method == "bootstrap"
    assert t.diff == 0.0 and t.lo == 0.0 and t.hi == 0.0 and t.p_value == 1.0
    assert t.n_boot_valid == 500


def test_paired_bootstrap_detects_clearly_better_model() -> None:
    rng = np.random.default_rng(5)
    y, s_good = _binormal(rng, 60, 60, 2.0)
    s_bad = s_good + rng.normal(scale=3.0, size=y.size)
    t = paired_bootstrap_auc(y, _two_col(_sigmoid(s_good)), _two_col(_sigmoid(s_bad)), n_boot=1000)
    assert t.diff > 0.1 and t.lo > 0.0
    assert t.p_value <= 2 * 1 / 1001 + 1e-12  # every resample favours the better model
    assert t.auc_a == pytest.approx(roc_auc_score(y, s_good)) and t.auc_b == pytest.approx(roc_auc_score(y, s_bad))


def test_paired_bootstrap_groups_and_undefined() -> None:
    rng = np.random.default_rng(6)
    y_pat, s_pat = _binormal(rng, 20, 20, 1.0)
    n_pat = y_pat.size
    s2_pat = s_pat + rng.normal(scale=1.0, size=n_pat)
    y, sa, sb = np.repeat(y_pat, 3), np.repeat(s_pat, 3), np.repeat(s2_pat, 3)
    naive = paired_bootstrap_auc(y, sa, sb, n_boot=600)
    grouped = paired_bootstrap_auc(y, sa, sb, groups=np.repeat(np.arange(n_pat), 3), n_boot=600)
    assert grouped.diff == pytest.approx(naive.diff)
    assert grouped.hi - grouped.lo > 1.3 * (naive.hi - naive.lo)
    one_class = paired_bootstrap_auc(np.ones(8, dtype=int), np.arange(8.0), np.arange(8.0)[::-1], n_boot=50)
    assert one_class.n_boot_valid == 0
    assert all(math.isnan(v) for v in (one_class.lo, one_class.hi, one_class.p_value, one_class.auc_a))


# ----------------------------------------------------------------------------- DeLong


def _brute_force_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """O(m n) structural components straight from DeLong et al. (1988)."""
    x, z = scores[:, y == 1], scores[:, y == 0]
    m, n = x.shape[1], z.shape[1]
    k = scores.shape[0]
    v10, v01 = np.zeros((k, m)), np.zeros((k, n))
    aucs = np.zeros(k)
    for r in range(k):
        psi = np.array([[1.0 if xi > zj else 0.5 if xi == zj else 0.0 for zj in z[r]] for xi in x[r]])
        aucs[r] = psi.mean()
        v10[r] = psi.mean(axis=1)
        v01[r] = psi.mean(axis=0)
    s10 = np.array([[np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1) for b in range(k)] for a in range(k)])
    s01 = np.array([[np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1) for b in range(k)] for a in range(k)])
    return aucs, s10 / m + s01 / n


def test_delong_matches_brute_force_structural_components() -> None:
    rng = np.random.default_rng(7)
    y = rng.permutation(np.r_[np.zeros(9, dtype=int), np.ones(7, dtype=int)])
    scores = np.round(np.stack([rng.normal(size=16) + y, rng.normal(size=16) + 0.5 * y]), 1)  # with ties
    aucs, cov = _delong_auc_cov(y, scores)
    ref_aucs, ref_cov = _brute_force_delong(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    t = delong_test(y, scores[0], scores[1])
    assert t.auc_a == pytest.approx(roc_auc_score(y, scores[0]), abs=1e-12)
    assert t.auc_b == pytest.approx(roc_auc_score(y, scores[1]), abs=1e-12)
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    assert t.se == pytest.approx(math.sqrt(var), rel=1e-10)
    assert t.p_value == pytest.approx(2 * norm.sf(abs(t.diff) / math.sqrt(var)), rel=1e-10)
    assert (t.lo + t.hi) / 2 == pytest.approx(t.diff) and t.hi - t.lo == pytest.approx(2 * 1.959964 * t.se, rel=1e-5)


def test_delong_identical_and_clearly_better() -> None:
    rng = np.random.default_rng(8)
    y, s = _binormal(rng, 50, 50, 1.0)
    same = delong_test(y, s, s.copy())
    assert same.diff == 0.0 and same.p_value == 1.0 and same.method == "delong" and same.n_boot_valid is None
    s_good = s + 1.5 * y
    s_bad = s + rng.normal(scale=3.0, size=y.size)
    better = delong_test(y, s_good, s_bad)
    assert better.diff > 0.1 and better.lo > 0 and better.p_value < 1e-4
    # [n, 2] probabilities: column 1 is used
    assert delong_test(y, _two_col(_sigmoid(s_good)), _two_col(_sigmoid(s_bad))) == better


def test_delong_null_rejection_rate_is_nominal() -> None:
    rng = np.random.default_rng(9)
    rejected = []
    for _ in range(400):
        y, _ = _binormal(rng, 40, 40, 0.0)
        signal = y * 1.0
        common = rng.normal(size=y.size)  # correlated models, equally good
        a = signal + common + rng.normal(size=y.size)
        b = signal + common + rng.normal(size=y.size)
        rejected.append(delong_test(y, a, b).p_value < 0.05)
    rate = float(np.mean(rejected))
    assert 0.02 <= rate <= 0.09, rate


def test_delong_agrees_with_paired_bootstrap() -> None:
    rng = np.random.default_rng(10)
    y, noise = _binormal(rng, 100, 100, 0.0)
    shared = rng.normal(size=y.size)
    a = 1.4 * y + noise
    b = 1.0 * y + 0.7 * noise + 0.7 * shared
    dl = delong_test(y, a, b)
    bs = paired_bootstrap_auc(y, a, b, n_boot=2000, seed=1)
    assert dl.diff == pytest.approx(bs.diff)
    assert dl.diff > 0
    assert dl.p_value < 0.05 and bs.p_value < 0.05
    assert 0.8 < bs.se / dl.se < 1.25, (bs.se, dl.se)
    assert abs(bs.lo - dl.lo) < 0.5 * dl.se and abs(bs.hi - dl.hi) < 0.5 * dl.se


def test_delong_rejects_bad_input() -> None:
    s = np.linspace(0, 1, 6)
    with pytest.raises(ValueError, match="binary-only.*labels"):
        delong_test(np.array([0, 1, 2, 0, 1, 2]), s, s)
    with pytest.raises(ValueError, match="only label 1"):
        delong_test(np.ones(6, dtype=int), s, s)
    with pytest.raises(ValueError, match=r"multi-class.*\(6, 3\)|\(6, 3\).*multi-class"):
        delong_test(np.array([0, 1, 0, 1, 0, 1]), np.full((6, 3), 1 / 3), s)
    with pytest.raises(ValueError, match="at least 2 slides of each class"):
        delong_test(np.array([0, 0, 0, 0, 0, 1]), s, s)


def test_compare_models_picks_method() -> None:
    rng = np.random.default_rng(12)
    y, s = _binormal(rng, 30, 30, 1.0)
    models = {"teacher": s, "student": s + rng.normal(size=y.size)}
    out = compare_models(y, models, reference="teacher")
    assert list(out) == ["student"] and out["student"].method == "delong"
    assert out["student"] == delong_test(y, models["student"], s)
    grouped = compare_models(y, models, groups=np.arange(y.size) // 2, reference="teacher", n_boot=200)
    assert grouped["student"].method == "bootstrap"
    with pytest.raises(ValueError, match="reference"):
        compare_models(y, models, reference="oracle")
    with pytest.raises(ValueError, match="independent"):
        compare_models(y, models, groups=np.arange(y.size), reference="teacher", method="delong")


# ----------------------------------------------------------------------------- ECE (common.metrics)


def test_ece_perfectly_calibrated_is_small_and_overconfident_is_not() -> None:
    rng = np.random.default_rng(13)
    p1 = rng.uniform(size=20000)
    y = (rng.uniform(size=p1.size) < p1).astype(np.int64)
    assert expected_calibration_error(y, _two_col(p1)) < 0.02
    sharpened = _sigmoid(4.0 * (np.log(p1) - np.log1p(-p1)))  # same ranking, overconfident
    assert expected_calibration_error(y, _two_col(sharpened)) > 0.1


def test_ece_constant_predictor_is_confidence_minus_accuracy() -> None:
    y = np.array([1] * 6 + [0] * 4)  # predicts class 1 at 0.9 every time; right 60 % of the time
    assert expected_calibration_error(y, _two_col(np.full(10, 0.9))) == pytest.approx(abs(0.9 - 0.6), abs=1e-12)
    y3 = np.array([0, 0, 1, 2])  # three classes, confidence 0.7 on class 0, accuracy 0.5
    probs3 = np.tile([0.7, 0.2, 0.1], (4, 1))
    assert expected_calibration_error(y3, probs3, n_bins=10) == pytest.approx(0.2, abs=1e-12)


def test_ece_two_bins_by_hand() -> None:
    probs = np.array([[0.4, 0.3, 0.3], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05], [0.8, 0.1, 0.1]])
    y = np.array([0, 1, 0, 2])
    # bin (0, 0.5]: confidences 0.4, 0.4, accuracy 1/2 -> |0.5 - 0.4| * 2/4
    # bin (0.5, 1]: confidences 0.9, 0.8, accuracy 1/2 -> |0.5 - 0.85| * 2/4
    assert expected_calibration_error(y, probs, n_bins=2) == pytest.approx(0.05 + 0.175, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3])
def test_vectorised_resample_metrics_match_common_metrics(k: int) -> None:
    from fedslide.common.evaluation.stats import _metric_values, _weighted_other_metrics

    rng = np.random.default_rng(k)
    n = 40
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    p = rng.dirichlet(np.ones(k), n)
    counts = rng.multinomial(n, np.ones(n) / n, size=25)
    names = ["acc", "balanced_acc", "f1", "brier", "ece"]
    fast = _weighted_other_metrics(y, p, counts, names, 10)
    for r, row in enumerate(counts):
        take = np.repeat(np.arange(n), row)
        slow = _metric_values(y[take], p[take], names, 10)
        for m in names:
            assert fast[m][r] == pytest.approx(slow[m], abs=1e-9), (m, r)
