"""Out-of-distribution score: the math, federated sums vs centralized, threshold on val, suppression, the bundle's
ood.json, and `fedslide predict`'s CSV columns, console warning and report.html."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedslide.client.encoders import PatchEncoder, build_encoder
from fedslide.client.inference import predict_slide, predict_slides
from fedslide.client.synth.slide import write_slide
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.preprocess import EncoderConfig
from fedslide.common.distillation.bundle import StudentBundle
from tests.feature_sites import tiny_student_bundle
from fedslide.common.distillation.ood import (
    PRIOR_SLIDES,
    OODStats,
    fit_ood,
    ood_sums,
    pool_ood_sums,
    slide_embeddings,
)

CLASSES = ["normal", "tumor"]


def _bags(rng: np.random.Generator, n: int, dim: int = 6, shift: float = 0.0) -> list[np.ndarray]:
    return [rng.normal(shift, 1.0, size=(int(rng.integers(3, 9)), dim)) * np.arange(1, dim + 1) for _ in range(n)]


def test_score_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    train = _bags(rng, 12)
    x = np.stack([b.mean(axis=0) for b in train])
    stats = OODStats.fit(x)
    var = x.var(axis=0)  # population variance over slides (numpy, ddof = 0)
    shrunk = (12 * var + PRIOR_SLIDES * np.median(var)) / (12 + PRIOR_SLIDES)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0))
    np.testing.assert_allclose(stats.var, shrunk)
    new = rng.normal(size=(5, 6))
    expected = np.sqrt(np.mean((new.mean(axis=0) - x.mean(axis=0)) ** 2 / shrunk))
    assert stats.score(new) == pytest.approx(expected)
    # with no shrinkage the score is sklearn's Mahalanobis distance under a diagonal covariance, / sqrt(D)
    from sklearn.covariance import EmpiricalCovariance

    cov = EmpiricalCovariance().fit(x)
    cov.covariance_ = np.diag(x.var(axis=0))
    cov.precision_ = np.diag(1.0 / x.var(axis=0))
    raw = OODStats(x.mean(axis=0), x.var(axis=0), 12)
    d2 = cov.mahalanobis(new.mean(axis=0)[None])[0]
    assert raw.score(new) == pytest.approx(np.sqrt(d2 / 6))


def test_shifted_slides_score_higher() -> None:
    rng = np.random.default_rng(1)
    stats = fit_ood(_bags(rng, 30), _bags(rng, 10))
    inside = stats.scores(slide_embeddings(_bags(rng, 20)))
    shifted = stats.scores(slide_embeddings(_bags(rng, 20, shift=1.5)))
    assert shifted.min() > np.median(inside)
    assert stats.threshold is not None and sum(stats.flagged(float(s)) for s in shifted) >= 18


def test_federated_sums_equal_centralized() -> None:
    rng = np.random.default_rng(2)
    sites = [slide_embeddings(_bags(rng, n)) for n in (5, 7, 9)]
    central = OODStats.fit(np.concatenate(sites))
    fed = OODStats.from_moments(*pool_ood_sums([ood_sums(s, min_slides=3) for s in sites]), source="federated")
    np.testing.assert_allclose(fed.mean, central.mean)
    np.testing.assert_allclose(fed.var, central.var)
    assert fed.slides == central.slides == 21


def test_suppression_withholds_small_sites() -> None:
    rng = np.random.default_rng(3)
    small, big = slide_embeddings(_bags(rng, 2)), slide_embeddings(_bags(rng, 8))
    released = ood_sums(small, min_slides=3)
    assert released.withheld and released.slides == 0
    assert not released.sums.any() and not released.squares.any()
    mean, var, n = pool_ood_sums([released, ood_sums(big, min_slides=3)])
    assert n == 8
    np.testing.assert_allclose(mean, big.mean(axis=0))
    with pytest.raises(ValueError, match="all withheld"):
        pool_ood_sums([released])


def test_threshold_is_val_quantile() -> None:
    rng = np.random.default_rng(4)
    train, val = _bags(rng, 20), _bags(rng, 9)
    stats = fit_ood(train, val, quantile=0.9)
    val_scores = stats.scores(slide_embeddings(val))
    assert stats.threshold == pytest.approx(np.quantile(val_scores, 0.9))
    assert stats.val_slides == 9 and stats.quantile == 0.9
    assert sum(stats.flagged(float(s)) for s in val_scores) == 1  # 9 scores, 0.9 quantile: only the largest is above
    assert fit_ood(train, []).threshold is None and not fit_ood(train, []).flagged(1e9)
    with pytest.raises(ValueError, match="quantile"):
        stats.with_threshold(slide_embeddings(val), 1.5)


def _bundle(encoder: PatchEncoder, ood: OODStats | None) -> StudentBundle:
    """A raw-input student bundle of `encoder` carrying `ood`."""
    bundle = tiny_student_bundle(encoder, CLASSES, student_input="raw", token_grid=0)
    bundle.ood = ood
    return bundle


def test_bundle_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    stats = fit_ood([rng.normal(size=(4, 8)) for _ in range(6)], [rng.normal(size=(4, 8)) for _ in range(3)])

    class _Enc:
        name, weights_hash, dim, fingerprint = "enc", "abc", 8, None

    bundle = _bundle(_Enc(), stats)  # type: ignore[arg-type]
    bundle.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["files"]["ood"] == "ood.json"
    loaded = StudentBundle.load(tmp_path / "b").ood
    assert loaded is not None and loaded.threshold == stats.threshold and loaded.slides == 6
    np.testing.assert_allclose(loaded.var, stats.var)
    _bundle(_Enc(), None).save(tmp_path / "b")  # type: ignore[arg-type]
    assert not (tmp_path / "b" / "ood.json").exists() and StudentBundle.load(tmp_path / "b").ood is None


def test_predict_reports_ood(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    encoder = build_encoder(EncoderConfig())
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "near.tif", 700, 700, 0.5, "generic", seed=3)
    write_slide(slides / "far.tif", 700, 700, 0.5, "generic", seed=9, tumor=True, tumor_fraction=0.6)
    cfg = PredictConfig.model_validate({"num_workers": 0, "batch_size": 16, "progress": False})
    plain = _bundle(encoder, None)
    emb = {
        name: predict_slide(slides / f"{name}.tif", plain, encoder, cfg, keep_arrays=True).low_pass.features.mean(0)  # type: ignore[union-attr]
        for name in ("near", "far")
    }
    # training slides scattered around "near": it scores low, "far" high; the threshold sits between them
    rng = np.random.default_rng(0)
    spread = 0.02 * np.abs(emb["near"] - emb["far"]) + 1e-4
    stats = OODStats.fit(emb["near"] + rng.normal(size=(10, encoder.dim)) * spread)
    near, far = stats.scores(emb["near"])[0], stats.scores(emb["far"])[0]
    assert near < far
    stats.threshold = float((near + far) / 2)
    run = predict_slides(slides, _bundle(encoder, stats), tmp_path / "out", cfg, encoder=encoder)
    by_id = {p.slide_id: p for p in run.predictions}
    assert by_id["far"].ood_flag and not by_id["near"].ood_flag
    with (tmp_path / "out" / "predictions.csv").open() as fh:
        reader = csv.DictReader(fh)
        rows = {r["slide_id"]: r for r in reader}
        assert reader.fieldnames is not None and reader.fieldnames[-2:] == ["ood_score", "ood_flag"]
    assert rows["far"]["ood_flag"] == "1" and rows["near"]["ood_flag"] == "0"
    assert float(rows["far"]["ood_score"]) == pytest.approx(far, rel=1e-3)
    warning = [line for line in run.summary_lines() if "WARNING" in line]
    assert len(warning) == 1 and "far" in warning[0] and "near" not in warning[0]
    timing = json.loads((tmp_path / "out" / "timing.json").read_text())
    assert timing["summary"]["ood"]["flagged"] == ["far"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "WARNING: 1 slide(s)" in page and "far" in page and page.count("data:image/png;base64") == 2
