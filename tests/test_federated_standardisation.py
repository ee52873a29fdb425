"""Federated input standardisation and temperature scaling, wired end to end: sites' feature sums at the handshake,
the server's pooled statistics sent back, standardised model inputs at the sites, the temperatures picked from
the sites' summed val NLL, and both in the final bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flwr.app import Message, MetricRecord

from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.features import feature_path, read_feature_file
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.feature_stats import stats_from_record, stats_record
from fedslide.common.federation.temperature import grid_metrics, pick_temperature
from fedslide.common.training.standardize import FeatureStats
from tests.feature_sites import D, ENCODER, make_site
from tests.test_federation import Crash, _assert_same_models, crash_in_teacher_round_2, federate, tiny_config

RUN = "std"
SUPPRESS = 4  # the third site has fewer training slides: its sums are withheld


def _train_ids(site: Path) -> list[str]:
    with (site / "labels.csv").open() as handle:
        return [row["slide_id"] for row in csv.DictReader(handle) if row["split"] == "train"]


def _pooled_by_hand(sites: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population sd of every 20x instance of the training bags of the sites given."""
    rows = [
        read_feature_file(feature_path(site, ENCODER, "high", sid)).features.astype(np.float64)
        for site in sites
        for sid in _train_ids(site)
    ]
    x = np.concatenate(rows)
    return x.mean(0), x.std(0)


FORCED_T = 5  # index of the grid temperature the sites' rewritten calibrate replies favour (T = 3)


def favour_grid_index(node: int, reply: Message) -> Message:
    """A reply hook that rewrites each counted calibrate reply's NLLs to be least at FORCED_T (models that the tiny
    run leaves under-confident would pick T = 1, which would not show the temperature travelling)."""
    if reply.metadata.message_type != ph.CALIBRATE.message_type or reply.has_error():
        return reply
    metrics = reply.content.metric_records[p.METRICS]
    if int(metrics[ph.VAL_N]) == 0:
        return reply
    forced: dict[str, int | float] = {ph.VAL_N: int(metrics[ph.VAL_N])}
    for model in ph.CALIBRATED_MODELS:
        forced.update({ph.nll_metric(model, k): 1.0 + (k - FORCED_T) ** 2 for k in range(len(ph.TEMPERATURES))})
    reply.content.metric_records[p.METRICS] = MetricRecord(forced)
    return reply


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, list[Path]]:
    root = tmp_path_factory.mktemp("std-sites")
    sites = [
        make_site(root, "site1", {"train": 8, "val": 4, "test": 4}, seed=1),
        make_site(root, "site2", {"train": 8, "val": 4, "test": 4}, seed=2),
        make_site(root, "site3", {"train": 3, "val": 2, "test": 3}, seed=3),
    ]
    cfg = tiny_config(
        tmp_path_factory.mktemp("std-run"), RUN, standardize=True, calibrate=True, suppress_below=SUPPRESS
    )
    result, grid = federate(sites, cfg, favour_grid_index)
    return result, grid, sites


@pytest.mark.slow
def test_global_stats_are_the_pooled_training_bags_of_the_unsuppressed_sites(run: tuple[Any, Any, list[Path]]) -> None:
    result, _, sites = run
    assert result.fed.standardize is not None
    stats = stats_from_record(result.fed.standardize, D)
    mean, std = _pooled_by_hand(sites[:2])  # site3 (3 training slides < suppress-below 4) counts for nothing
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.std, std, rtol=1e-5, atol=1e-5)
    everyone, _ = _pooled_by_hand(sites)
    assert not np.allclose(stats.mean, everyone, atol=1e-5)  # the suppressed site would have moved the mean


@pytest.mark.slow
def test_handshake_egress_is_exactly_the_declared_sums(run: tuple[Any, Any, list[Path]]) -> None:
    _, _, sites = run
    for site, withheld in zip(sites, (False, False, True)):
        ledger = [json.loads(line) for line in (site / "runs" / RUN / "egress.jsonl").read_text().splitlines()]
        handshake = [e for e in ledger if e["phase"] == ph.HANDSHAKE.name]
        assert len(handshake) == 1
        arrays = {a["name"]: a for a in handshake[0]["arrays"]}
        assert set(arrays) == {ph.FEATURE_SUMS, ph.FEATURE_SQUARES, ph.FEATURE_COUNTS}  # ood-stats is off
        assert arrays[ph.FEATURE_SUMS]["shape"] == [D] and arrays[ph.FEATURE_SUMS]["dtype"] == "float64"
        assert arrays[ph.FEATURE_COUNTS]["shape"] == [2] and arrays[ph.FEATURE_COUNTS]["dtype"] == "int64"
        # every later reply carries no feature statistics (only the handshake does)
        later = {a["name"] for e in ledger if e["phase"] != ph.HANDSHAKE.name for a in e["arrays"]}
        assert not later & {ph.FEATURE_SUMS, ph.FEATURE_SQUARES, ph.FEATURE_COUNTS, ph.FEATURE_MEAN, ph.FEATURE_STD}
    _, grid, _ = run
    replies = [r for r in grid.received if r.content.array_records.get("stats") is not None]
    counts = sorted(
        r.content.array_records["stats"][ph.FEATURE_COUNTS].numpy().tolist()
        for r in replies
        if ph.FEATURE_COUNTS in r.content.array_records["stats"]
    )
    assert counts[0] == [0, 0]  # site3's release: withheld as a whole
    assert [c[1] for c in counts[1:]] == [8, 8]


@pytest.mark.slow
def test_bundle_holds_the_stats_and_reproduces_the_sites_standardised_predictions(
    run: tuple[Any, Any, list[Path]],
) -> None:
    result, _, sites = run
    stats = stats_from_record(result.fed.standardize, D)
    site = sites[0]
    bundle = StudentBundle.load(site / "runs" / RUN / "student_bundle")
    temperatures = result.fed.ckpt.phase_done(ph.CALIBRATE.checkpoint)["temperatures"]
    assert temperatures == {model: ph.TEMPERATURES[FORCED_T] for model in ph.CALIBRATED_MODELS}
    assert bundle.teacher_scaling.temperature == temperatures["teacher_high"] in ph.TEMPERATURES
    assert bundle.student_scaling.temperature == temperatures["student_low"] in ph.TEMPERATURES
    for scaling in (bundle.teacher_scaling, bundle.student_scaling):  # the default student reads adapted tokens
        assert scaling.stats is not None
        np.testing.assert_array_equal(scaling.stats.mean, stats.mean)
        np.testing.assert_array_equal(scaling.stats.std, stats.std)
    # the site's final evaluation fed the teacher standardised inputs and scaled its logits by T: predict_high on
    # the raw file gives the site's predictions
    with (site / "runs" / RUN / "predictions.csv").open() as handle:
        row = next(csv.DictReader(handle))
    raw = read_feature_file(feature_path(site, ENCODER, "high", row["slide_id"]))
    probs = bundle.predict_high(torch.from_numpy(raw.features), torch.from_numpy(raw.coords))[0]
    np.testing.assert_allclose(probs.numpy(), [float(row["teacher_high_p0"]), float(row["teacher_high_p1"])], atol=1e-5)


@pytest.mark.slow
def test_calibrate_replies_carry_exactly_the_grid_metrics(run: tuple[Any, Any, list[Path]]) -> None:
    _, _, sites = run
    grid = {ph.nll_metric(m, k) for m in ph.CALIBRATED_MODELS for k in range(len(ph.TEMPERATURES))}
    for site, suppressed in zip(sites, (False, False, True)):  # site3: 2 val slides < suppress-below 4
        ledger = [json.loads(line) for line in (site / "runs" / RUN / "egress.jsonl").read_text().splitlines()]
        [entry] = [e for e in ledger if e["phase"] == ph.CALIBRATE.name]
        assert entry["arrays"] == []
        names = {name.removeprefix("metrics.") for name in entry["metrics"]}
        assert names == ({ph.VAL_N} if suppressed else grid | {ph.VAL_N})


def test_stats_record_round_trips_and_refuses_bad_shapes() -> None:
    stats = FeatureStats(np.arange(4, dtype=np.float32), np.full(4, 2.0, dtype=np.float32), count=7)
    back = stats_from_record(stats_record(stats), 4)
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.std, stats.std)
    assert back.count == 7
    with pytest.raises(ValueError, match="shape"):
        stats_from_record(stats_record(stats), 5)
    bad = FeatureStats(np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.float32), count=1)
    with pytest.raises(ValueError, match="sds <= 0"):
        stats_from_record(stats_record(bad), 4)


def test_the_temperature_of_an_over_confident_model_is_recovered() -> None:
    rng = np.random.default_rng(0)
    true_logits = torch.from_numpy(rng.normal(scale=1.5, size=(4000, 3)))
    labels = torch.multinomial(torch.softmax(true_logits, dim=1), 1).squeeze(1).numpy()
    over = true_logits * 3.0  # the model's logits: three times too sharp
    # two sites with their share of the slides; their summed NLLs pick T = 3 (a grid value)
    replies = [
        {**grid_metrics("student_low", over[part], labels[part]), ph.VAL_N: len(part)}
        for part in (np.arange(0, 1500), np.arange(1500, 4000))
    ]
    assert pick_temperature(replies, "student_low") == 3.0
    before = torch.nn.functional.cross_entropy(over, torch.from_numpy(labels))
    after = torch.nn.functional.cross_entropy(over / 3.0, torch.from_numpy(labels))
    assert after < before
    # a site that counted nothing, or sent an incomplete grid, counts for nothing; none at all gives T = 1
    assert (
        pick_temperature([*replies, {ph.VAL_N: 0}, {ph.VAL_N: 5, ph.nll_metric("student_low", 0): 0.0}], "student_low")
        == 3.0
    )
    assert pick_temperature([{ph.VAL_N: 0}], "student_low") == 1.0


def test_calibrate_metrics_are_declared_exactly() -> None:
    declared = {ph.nll_metric(m, k) for m in ph.CALIBRATED_MODELS for k in range(len(ph.TEMPERATURES))}
    assert all(ph.CALIBRATE.allows_metric(name) for name in declared | {ph.VAL_N})
    for name in ("nll-student_low-9", "nll-baseline_low-0", "nll-student_low-01", "student_low.auc", "n-test"):
        assert not ph.CALIBRATE.allows_metric(name), name


def test_standardize_and_calibrate_are_off_by_default_and_declared_where_sent() -> None:
    from fedslide.common.config.federation import FederationConfig

    assert FederationConfig().standardize is False and FederationConfig().calibrate is False
    sent = {phase.name for phase in ph.ALL if ph.STANDARDIZE in phase.sends}
    assert sent == {
        "teacher",
        "cluster-init",
        "cluster-stats",
        "experts",
        "kd-cache",
        "logits",
        "calibrate",
        "evaluate",
    }


@pytest.mark.slow
def test_a_resumed_run_keeps_the_pooled_stats_and_gives_the_uninterrupted_result(
    run: tuple[Any, Any, list[Path]], tmp_path: Path
) -> None:
    reference, _, sites = run
    crashed = tiny_config(tmp_path, "std-resume", standardize=True, calibrate=True, suppress_below=SUPPRESS)
    with pytest.raises(Crash):
        federate(sites, crashed, crash_in_teacher_round_2())
    resumed, _ = federate(sites, crashed.model_copy(update={"resume": True}), favour_grid_index)
    assert resumed.fed.standardize is not None and reference.fed.standardize is not None
    for name in (ph.FEATURE_MEAN, ph.FEATURE_STD):
        np.testing.assert_array_equal(resumed.fed.standardize[name].numpy(), reference.fed.standardize[name].numpy())
    _assert_same_models(reference.run_dir, resumed.run_dir, atol=1e-5)
    done = resumed.fed.ckpt.phase_done(ph.CALIBRATE.checkpoint)
    assert done["temperatures"] == reference.fed.ckpt.phase_done(ph.CALIBRATE.checkpoint)["temperatures"]
