"""Standardisation and temperature in bundles; federated standardisation statistics from per-site sums."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Array, ArrayRecord, RecordDict

from fedslide.common.distillation.adapter import AdapterSpec, build_adapter
from fedslide.common.distillation.bundle import STUDENT_FILE, BundleMeta, StudentBundle
from fedslide.common.egress import EgressViolation, check_reply
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.feature_stats import (
    federated_stats,
    feature_sums_allowed,
    feature_sums_from_record,
    feature_sums_record,
)
from fedslide.common.models.registry import build_model
from fedslide.common.training.cohort import Cohort, Slide
from fedslide.common.training.scaling import ModelScaling
from fedslide.common.training.standardize import FeatureStats, fit_stats, pooled_stats, site_feature_sums
from tests.feature_sites import D, ENCODER, GRID, HASH, SLOTS, tiny


def _stats(seed: int, clip: float | None = 3.0) -> FeatureStats:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=D).astype(np.float32)
    std = rng.uniform(0.5, 2.0, size=D).astype(np.float32)
    return FeatureStats(mean=mean, std=std, count=100, clip=clip)


def _bundle(student_input: str, student: ModelScaling | None, teacher: ModelScaling | None) -> StudentBundle:
    torch.manual_seed(0)
    meta = BundleMeta(ENCODER, HASH, D, None, 2.0, 256, 0.5, 256, GRID, GRID, student_input, ["neg", "pos"], {}, {})
    adapter = None if student_input == "raw" else build_adapter(AdapterSpec(D, D, 8, SLOTS))
    return StudentBundle(
        meta,
        adapter,
        build_model(tiny()),
        build_model(tiny()),
        tiny(),
        tiny(),
        student_scaling=student,
        teacher_scaling=teacher,
    )


@pytest.mark.parametrize("student_input", ["raw", "tokens"])
def test_bundle_carries_stats_and_temperature_and_predict_applies_them(tmp_path: Path, student_input: str) -> None:
    student_scaling, teacher_scaling = ModelScaling(_stats(1), 2.5), ModelScaling(_stats(2, None), 1.7)
    bundle = _bundle(student_input, student_scaling, teacher_scaling)
    bundle.save(tmp_path / "b")
    loaded = StudentBundle.load(tmp_path / "b")
    for got, want in ((loaded.student_scaling, student_scaling), (loaded.teacher_scaling, teacher_scaling)):
        assert got.stats is not None and want.stats is not None
        np.testing.assert_array_equal(got.stats.mean, want.stats.mean)
        np.testing.assert_array_equal(got.stats.std, want.stats.std)
        assert (got.stats.clip, got.temperature) == (want.stats.clip, want.temperature)

    features = 4.0 * torch.randn(5, D) + 3.0  # far off the statistics: the clip bites on some values
    tokens = torch.randn(5, SLOTS, D) if student_input == "tokens" else None
    probs, *_ = loaded.predict_low(features, tokens)
    instances, _, _ = loaded.student_instances(features, tokens)
    stats = student_scaling.stats
    assert stats is not None and stats.clip is not None
    z = ((instances - torch.from_numpy(stats.mean)) / torch.from_numpy(stats.std)).clamp(-stats.clip, stats.clip)
    with torch.no_grad():
        expected = torch.softmax(loaded.student(z[None]).logits.double() / 2.5, dim=-1)[0].float()
        unscaled = torch.softmax(loaded.student(instances[None]).logits.double(), dim=-1)[0].float()
    torch.testing.assert_close(probs, expected)
    assert not torch.allclose(probs, unscaled, atol=1e-4)  # the scaling changed the output

    high = torch.randn(7, D)
    probs_high, _ = loaded.predict_high(high)
    t_stats = teacher_scaling.stats
    assert t_stats is not None
    z_high = (high - torch.from_numpy(t_stats.mean)) / torch.from_numpy(t_stats.std)
    with torch.no_grad():
        expected_high = torch.softmax(loaded.teacher(z_high[None]).logits.double() / 1.7, dim=-1)[0].float()
    torch.testing.assert_close(probs_high, expected_high)


def test_a_bundle_without_scaling_loads_as_the_identity(tmp_path: Path) -> None:
    bundle = _bundle("raw", ModelScaling(_stats(1), 3.0), None)
    bundle.save(tmp_path / "b")
    path = tmp_path / "b" / STUDENT_FILE
    payload = torch.load(path, weights_only=True)
    del payload["standardize"], payload["temperature"]  # as bundles were written before they carried them
    torch.save(payload, path)
    loaded = StudentBundle.load(tmp_path / "b")
    assert loaded.student_scaling.is_identity and loaded.teacher_scaling.is_identity
    features = torch.randn(6, D)
    probs, *_ = loaded.predict_low(features)
    with torch.no_grad():
        expected = torch.softmax(loaded.student(features[None]).logits.float(), dim=-1)[0]
    torch.testing.assert_close(probs, expected)


def test_temperature_must_be_positive() -> None:
    with pytest.raises(ValueError, match="temperature"):
        ModelScaling(temperature=0.0)


# ---------------------------------------------------------------- federated standardisation


def _cohort(bags: list[np.ndarray]) -> Cohort:
    slides = [Slide(f"s{i}", i % 2, f"p{i}", "train", Path(f"s{i}.h5"), len(b)) for i, b in enumerate(bags)]
    return Cohort(
        slides, ("a", "b"), bags[0].shape[1], False, {}, {s.slide_id: (b, None) for s, b in zip(slides, bags)}
    )


def _site_bags(rng: np.random.Generator, n: int, offset: float, scale: float) -> list[np.ndarray]:
    return [(offset + scale * rng.normal(size=(int(rng.integers(3, 20)), D))).astype(np.float32) for _ in range(n)]


def test_federated_stats_equal_the_pooled_stats_of_the_training_bags() -> None:
    rng = np.random.default_rng(0)
    sites = [_site_bags(rng, n, offset, scale) for n, offset, scale in ((6, 0.0, 1.0), (9, 5.0, 3.0), (4, -2.0, 0.5))]
    train = [np.arange(n - 1) for n in (6, 9, 4)]  # each site's last bag is held out: it must not count
    records = []
    for bags, idx in zip(sites, train):
        release = site_feature_sums(_cohort(bags), idx, min_slides=3)
        record = feature_sums_record(release)
        check_reply(RecordDict({p.STATS: record}), feature_sums_allowed(D))  # the declared egress, exactly
        records.append(record)
    federated = federated_stats(records, D, min_slides=3, clip=10.0)
    union = [bag for bags, idx in zip(sites, train) for bag in (bags[i] for i in idx)]
    pooled = fit_stats(_cohort(union), np.arange(len(union)), clip=10.0)
    np.testing.assert_allclose(federated.mean, pooled.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(federated.std, pooled.std, rtol=1e-5)
    assert federated.count == pooled.count == sum(len(b) for b in union) and federated.clip == 10.0
    everything = np.concatenate(union).astype(np.float64)  # and both are the plain population statistics
    np.testing.assert_allclose(federated.mean, everything.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(federated.std, everything.std(0), rtol=1e-4)


def test_a_site_below_suppress_below_releases_nothing_and_counts_for_nothing() -> None:
    rng = np.random.default_rng(1)
    big, small = _site_bags(rng, 8, 0.0, 1.0), _site_bags(rng, 2, 100.0, 1.0)
    withheld = site_feature_sums(_cohort(small), np.arange(2), min_slides=3)
    assert withheld.withheld and withheld.count == 0
    assert not withheld.sums.any() and not withheld.squares.any()
    kept = site_feature_sums(_cohort(big), np.arange(8), min_slides=3)
    federated = federated_stats([feature_sums_record(kept), feature_sums_record(withheld)], D, min_slides=3)
    alone = fit_stats(_cohort(big), np.arange(8))
    np.testing.assert_allclose(federated.mean, alone.mean, rtol=1e-6, atol=1e-6)
    # the server also drops a release of fewer slides than its own floor, whatever the site did
    unsuppressed = feature_sums_record(site_feature_sums(_cohort(small), np.arange(2)))
    again = federated_stats([feature_sums_record(kept), unsuppressed], D, min_slides=3)
    np.testing.assert_allclose(again.mean, alone.mean, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no instances"):
        federated_stats([unsuppressed], D, min_slides=3)
    with pytest.raises(ValueError, match="no instances"):
        pooled_stats([withheld])


def test_the_feature_sums_reply_carries_exactly_its_declared_arrays() -> None:
    rng = np.random.default_rng(2)
    record = feature_sums_record(site_feature_sums(_cohort(_site_bags(rng, 4, 0.0, 1.0)), np.arange(4)))
    allowed = feature_sums_allowed(D)
    check_reply(RecordDict({p.STATS: record}), allowed)
    leak = ArrayRecord({**dict(record.items()), "features": Array(np.zeros((3, D), np.float32))})
    with pytest.raises(EgressViolation, match="not declared"):
        check_reply(RecordDict({p.STATS: leak}), allowed)
    with pytest.raises(EgressViolation, match="allowed only"):
        check_reply(RecordDict({p.STATS: record}), feature_sums_allowed(D + 1))
    assert ph.HANDSHAKE.allows_array(ph.FEATURE_SUMS) and not ph.HANDSHAKE.allows_array("feature-sums-x")
    wrong = ArrayRecord({**dict(record.items()), ph.FEATURE_COUNTS: Array(np.array([-1, 2], np.int64))})
    with pytest.raises(ValueError, match="feature-counts"):
        feature_sums_from_record(wrong, D)


def test_distill_fits_each_bundled_models_temperature_on_the_val_slides() -> None:
    from types import SimpleNamespace

    from fedslide.common.distillation.pipeline import TrainedModel, val_scaling

    rng = np.random.default_rng(3)
    bags = _site_bags(rng, 40, 0.0, 1.0)
    cohort = _cohort(bags)
    cohort.slides = [
        Slide(s.slide_id, int(rng.integers(0, 2)), s.patient_id, s.split, s.path, s.num_instances)
        for s in cohort.slides
    ]  # labels unrelated to the features: a confident model is wrong often
    torch.manual_seed(0)
    model = build_model(tiny())
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(200.0)
    data = SimpleNamespace(labels=cohort.labels)
    run = SimpleNamespace(val=np.arange(40), device=torch.device("cpu"), data=data)
    scaling = val_scaling(run, TrainedModel(model.eval(), None, cohort, "raw"))  # type: ignore[arg-type]
    assert scaling.stats is None and scaling.temperature > 2.0
    none = val_scaling(
        SimpleNamespace(val=np.arange(0), device=run.device, data=data), TrainedModel(model, None, cohort, "raw")
    )  # type: ignore[arg-type]
    assert none.is_identity
