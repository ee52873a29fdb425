"""Honest DP (site-side clipping and noise, ε against the coordinator, DP-skipped rounds as errors) and robust
aggregation (handshake weights, trimming at least one site per end, robust experts/logits/best round, validated
cluster statistics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from fedslide.client.client_app import app as client_app
from fedslide.client.local_dp import BUDGET_FILE, SiteBudget, apply_local_dp, privatize
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.floors import SiteFloors, SiteRefusal
from fedslide.common.dp import (
    cluster_epsilon,
    cluster_noise_multiplier,
    composed_epsilon,
    planned_cluster_releases,
    planned_releases,
    site_epsilon,
    slide_epsilon_against_coordinator,
)
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.flower_compat import restamped
from fedslide.server.local_grid import FIRST_NODE, LocalGrid
from fedslide.server.privacy import dp_strategy, make_accountant, privacy_report
from fedslide.server.protocol import _stats_problem
from fedslide.server.strategies import (
    BestRounds,
    ExpertsFedAvg,
    FederationError,
    Group,
    PhaseStrategy,
    TrimmedMean,
    UpdateValidator,
    restore_dtypes,
    robust_combine,
    trim_count,
)
from tests.feature_sites import make_site


def _record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _reply(node: int, arrays: ArrayRecord, **metrics: float) -> Message:
    """A train reply from `node` as a strategy receives it."""
    sent = Message(content=RecordDict({}), dst_node_id=node, message_type="train")
    reply = Message(RecordDict({p.ARRAYS: arrays, p.METRICS: MetricRecord(metrics)}), reply_to=sent)
    return restamped(reply, src_node_id=node)


# ---- (a) site-side DP ----------------------------------------------------------------------------------------------
def test_privatize_clips_the_update_and_keeps_integer_arrays_as_received() -> None:
    sent = _record(w=np.zeros(1000, np.float32), steps=np.array([5], np.int64))
    reply = _record(w=np.full(1000, 3.0, np.float32), steps=np.array([99], np.int64))
    clipped, norm = privatize(sent, reply, 0.0, 2.0, np.random.default_rng(0))
    assert norm == pytest.approx(3.0 * np.sqrt(1000))
    assert np.linalg.norm(clipped["w"].numpy()) == pytest.approx(2.0, rel=1e-5)
    assert clipped["steps"].numpy().tolist() == [5]  # the site's batch count does not leave
    noised, _ = privatize(sent, reply, 1.5, 2.0, np.random.default_rng(1))
    noise = noised["w"].numpy() - clipped["w"].numpy()
    assert noised["w"].numpy().dtype == np.float32
    assert np.std(noise) == pytest.approx(1.5 * 2.0, rel=0.1)  # σ × clip per coordinate


def test_site_epsilon_composes_releases_and_a_site_stops_at_its_maximum(tmp_path: Path) -> None:
    assert site_epsilon(1.0, 1, 1e-5) < site_epsilon(1.0, 10, 1e-5) < site_epsilon(0.5, 10, 1e-5)
    assert site_epsilon(0.0, 3, 1e-5) == float("inf") and site_epsilon(1.0, 0, 1e-5) == 0.0
    cfg = FederationConfig(local_dp_noise_multiplier=4.0)
    limit = (site_epsilon(4.0, 2, cfg.dp_delta) + site_epsilon(4.0, 3, cfg.dp_delta)) / 2  # two releases fit
    budget = SiteBudget(tmp_path / "run" / BUDGET_FILE)
    floors = SiteFloors.from_node_config({"max-local-epsilon": limit})
    budget.spend(cfg, floors)
    budget.spend(cfg, floors)
    with pytest.raises(SiteRefusal, match="release 3") as refusal:
        budget.spend(cfg, floors)
    assert refusal.value.code == "floor-local-epsilon" and budget.releases() == 2
    sent = _record(w=np.zeros(4, np.float32))
    with pytest.raises(SiteRefusal):  # nothing privatized or sent past the budget
        apply_local_dp(sent, sent, cfg, floors, tmp_path / "run")
    off = FederationConfig()
    assert apply_local_dp(sent, sent, off, floors, tmp_path / "run") is sent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site(tmp_path_factory.mktemp("dp"), "site1", {"train": 4, "val": 2, "test": 2}, seed=1)


def _handshake(site: Path, node_config: dict[str, Any], cfg: FederationConfig) -> Message:
    grid = LocalGrid(client_app, [{"site-dir": str(site), **node_config}], cfg.to_run_config())
    content = RecordDict({p.CONFIG: ConfigRecord({ph.RUN_ID: "dp", ph.PHASE: ph.HANDSHAKE.phase})})
    message = Message(content=content, dst_node_id=FIRST_NODE, message_type=ph.HANDSHAKE.message_type)
    (reply,) = grid.send_and_receive([message])
    return reply


def test_site_floors_refuse_too_little_site_side_noise_or_too_much_planned_epsilon(site: Path) -> None:
    reply = _handshake(site, {"min-local-dp-noise-multiplier": 1.0}, FederationConfig(run_id="dp"))
    assert reply.has_error() and "[floor-local-dp]" in reply.error.reason
    cfg = FederationConfig(run_id="dp", local_dp_noise_multiplier=1.0)
    reply = _handshake(site, {"max-local-epsilon": 1.0}, cfg)
    assert reply.has_error() and "floor-local-epsilon" in reply.error.reason
    assert f"{planned_releases(cfg)} site-side release(s)" in reply.error.reason
    reply = _handshake(site, {"require-dp": True, "min-local-dp-noise-multiplier": 1.0}, cfg)
    assert not reply.has_error()  # site-side DP satisfies require-dp


def test_site_side_dp_with_logits_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local-dp-noise-multiplier > 0 with mode = 'logits'"):
        FederationConfig(mode="logits", proxy_dir=tmp_path, local_dp_noise_multiplier=1.0)


def test_the_report_states_epsilon_against_third_parties_and_against_the_coordinator() -> None:
    central = FederationConfig(dp_noise_multiplier=1.0)
    report = privacy_report(central, make_accountant(central, 3))
    assert report["against_coordinator"]["enabled"] is False and report["against_coordinator"]["epsilon"] is None
    assert report["against_third_parties"]["by"] == ["server-side DP"]
    local = FederationConfig(local_dp_noise_multiplier=2.0)
    report = privacy_report(local, None)
    coordinator = report["against_coordinator"]
    assert coordinator["releases_per_site"] == planned_releases(local)
    assert coordinator["epsilon"] == pytest.approx(site_epsilon(2.0, planned_releases(local), local.dp_delta))
    assert report["against_third_parties"]["epsilon"] == coordinator["epsilon"]  # post-processing of the local one
    assert "not covered" in report["not_covered"]


def test_a_round_the_dp_wrapper_skipped_is_recorded_as_an_error() -> None:
    cfg = FederationConfig(dp_noise_multiplier=1.0)
    accountant = make_accountant(cfg, 3)
    assert accountant is not None
    inner = dp_strategy(cfg, 3, 2, accountant)
    validator = UpdateValidator(norm_factor=None)
    strategy = PhaseStrategy(inner, "teacher", BestRounds({"": Group()}), validator, 2, site_counts={1: 4, 2: 4, 3: 4})
    sent = _record(w=np.zeros(3, np.float32))
    strategy._sent = sent
    inner._prepare_accounting(1, [Message(RecordDict({}), dst_node_id=n, message_type="train") for n in (1, 2, 3)])
    inner.current_arrays = sent
    replies = [_reply(n, _record(w=np.ones(3, np.float32)), **{"num-examples": 4, "unit-weight": 1}) for n in (1, 2)]
    replies.append(_reply(3, _record(w=np.full(3, np.nan, np.float32)), **{"num-examples": 4, "unit-weight": 1}))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None  # Flower's wrapper released nothing: one of three sites was rejected
    assert [(e.phase, e.round) for e in validator.round_errors] == [("teacher", 1)]
    assert "no global model released from 2 valid update(s) of 3" in validator.round_errors[0].reason


# ---- (b) robust aggregation ----------------------------------------------------------------------------------------
def test_weights_come_from_the_handshake_not_from_what_a_site_says() -> None:
    validator = UpdateValidator(norm_factor=None)
    counts = {1: 1, 2: 3}
    strategy = PhaseStrategy(FedAvg(), "teacher", BestRounds({"": Group()}), validator, 1, site_counts=counts)
    strategy._sent = _record(w=np.zeros(1, np.float32))
    replies = [
        _reply(1, _record(w=np.array([4.0], np.float32)), **{"num-examples": 1000}),  # claims 1000 slides
        _reply(2, _record(w=np.array([0.0], np.float32)), **{"num-examples": 1}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and arrays["w"].numpy()[0] == pytest.approx(1.0)  # (4·1 + 0·3) / 4


def test_an_expert_count_beyond_the_handshake_rejects_the_reply() -> None:
    validator = UpdateValidator(norm_factor=None)
    inner = ExpertsFedAvg(fraction_evaluate=0.0)
    strategy = PhaseStrategy(inner, "experts", BestRounds({}), validator, 1, site_counts={1: 4, 2: 4})
    zero = _record(**{"expert-0.w": np.zeros(2, np.float32)})
    strategy._sent = zero
    replies = [
        _reply(1, _record(**{"expert-0.w": np.ones(2, np.float32)}), **{"n-expert-0": 3}),
        _reply(2, _record(**{"expert-0.w": np.full(2, 9.0, np.float32)}), **{"n-expert-0": 50}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and arrays["expert-0.w"].numpy().tolist() == [1.0, 1.0]
    assert [r.node for r in validator.rejections] == [2] and "outside [0, 4]" in validator.rejections[0].reason


def test_trimmed_mean_cuts_at_least_one_site_per_end_or_refuses() -> None:
    assert trim_count(3, 0.2) == 1 and trim_count(10, 0.2) == 2
    with pytest.raises(FederationError, match="needs at least 3 updates, got 2"):
        trim_count(2, 0.2)
    strategy = TrimmedMean(0.2, fraction_evaluate=0.0)
    values = [0.0, 1.0, 2.0, 1000.0]  # 0.2 × 4 sites trims nothing in Flower's FedTrimmedAvg
    replies = [_reply(n, _record(w=np.array([v], np.float32)), **{"num-examples": 1}) for n, v in enumerate(values, 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and arrays["w"].numpy()[0] == pytest.approx(1.5)
    stack = np.array([[0.0], [1.0], [100.0]])
    assert robust_combine(stack, "median", 0.2)[0] == 1.0 and robust_combine(stack, "trimmed-mean", 0.2)[0] == 1.0


def test_robust_experts_ignore_an_outlier_site() -> None:
    inner = ExpertsFedAvg("median", fraction_evaluate=0.0)
    replies = [
        _reply(n, _record(**{"expert-0.w": np.array([v], np.float32)}), **{"n-expert-0": 1, "num-examples": 1})
        for n, v in ((1, 1.0), (2, 2.0), (3, 500.0))
    ]
    arrays, _ = inner.aggregate_train(1, replies)
    assert arrays is not None and arrays["expert-0.w"].numpy()[0] == 2.0


def test_best_round_by_the_median_of_the_sites_losses() -> None:
    def contents(*losses: float) -> list[RecordDict]:
        return [RecordDict({"m": MetricRecord({"val-loss": v, "val-n": 10})}) for v in losses]

    arrays = _record(w=np.zeros(1, np.float32))
    for robust, best in ((False, 2), (True, 1)):
        tracker = BestRounds({"": Group()}, robust=robust)
        tracker.observe(1, arrays, contents(0.5, 0.5, 0.5))
        tracker.observe(2, arrays, contents(0.6, 0.6, -30.0))  # one site reports an absurdly low loss
        assert tracker.best[""]["round"] == best


def test_cluster_statistics_are_validated_at_the_server() -> None:
    sums, counts = np.zeros((2, 3)), np.array([1, 2])
    assert _stats_problem(sums, counts, 4, (2, 3)) is None
    assert "NaN" in str(_stats_problem(np.full((2, 3), np.nan), counts, 4, None))
    assert "[0, 4]" in str(_stats_problem(sums, np.array([3, 2]), 4, None))  # more slides than it has
    assert "[0, 4]" in str(_stats_problem(sums, np.array([-1, 2]), 4, None))
    assert "expected (2, 4)" in str(_stats_problem(sums, counts, 4, (2, 4)))


def test_metrics_json_schema_keys_for_errors(tmp_path: Path) -> None:
    """The report writes round errors as an error status (write_report on a minimal metrics document)."""
    from fedslide.server.outputs import write_report

    metrics = {
        "run_id": "r",
        "mode": "weights",
        "classes": ["a", "b"],
        "encoder": "e",
        "sites": [],
        "overall_method": "m",
        "rows": [],
        "models": {m: {"per_site": {}} for m in ("teacher_high", "student_low", "baseline_low")},
        "cost": {
            "high": {"patches_per_slide": None, "seconds_per_slide": None},
            "low": {"patches_per_slide": None, "seconds_per_slide": None},
            "high_over_low_patches_per_slide": None,
            "note": "",
        },
        "communication": {"per_phase": {}},
        "learning_curves": {},
        "privacy": privacy_report(FederationConfig(local_dp_noise_multiplier=1.0), None),
        "config": json.loads(json.dumps(FederationConfig().to_toml_dict(), default=str)),
        "refused": [],
        "missing": [],
        "rejections": [],
        "round_errors": [{"phase": "teacher", "round": 2, "reason": "no global model released"}],
        "timings": {},
    }
    text = write_report(tmp_path, metrics).read_text()
    assert "**Status: error**" in text and "phase teacher round 2: no global model released" in text
    assert "against the coordinator" in text


@pytest.mark.parametrize("aggregation", ["mean", "median", "trimmed-mean"])
def test_integer_arrays_come_back_with_their_dtype_from_every_aggregation(aggregation: str) -> None:
    """BatchNorm's `num_batches_tracked` (int64) beside float32 weights: Flower's FedAvg, FedMedian and FedTrimmedAvg
    return it as float64; the phase hands it back as int64, so the sites' next replies still match the model."""
    inner = {
        "mean": lambda: FedAvg(fraction_evaluate=0.0),
        "median": lambda: FedMedian(fraction_evaluate=0.0),
        "trimmed-mean": lambda: TrimmedMean(0.2, fraction_evaluate=0.0),
    }[aggregation]()
    validator = UpdateValidator(norm_factor=None)
    strategy = PhaseStrategy(inner, "teacher", BestRounds({"": Group()}), validator, 1, site_counts={1: 4, 2: 4, 3: 4})
    sent = _record(w=np.zeros(2, np.float32), steps=np.array(10, np.int64), ids=np.arange(3, dtype=np.int32))
    strategy._sent = sent
    replies = [
        _reply(n, _record(w=np.full(2, v, np.float32), steps=np.array(s, np.int64), ids=np.arange(3, dtype=np.int32)))
        for n, v, s in ((1, 1.0, 11), (2, 2.0, 12), (3, 9.0, 14))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert {k: str(a.numpy().dtype) for k, a in arrays.items()} == {"w": "float32", "steps": "int64", "ids": "int32"}
    assert int(arrays["steps"].numpy()) == 12 and arrays["ids"].numpy().tolist() == [0, 1, 2]  # mean 12.33 -> 12
    expected_w = {"mean": 4.0, "median": 2.0, "trimmed-mean": 2.0}[aggregation]
    assert arrays["w"].numpy().tolist() == pytest.approx([expected_w] * 2)
    # the next round's replies (int64 counters, as the sites' models hold them) pass the update check
    nxt = _record(w=np.zeros(2, np.float32), steps=np.array(15, np.int64), ids=np.arange(3, dtype=np.int32))
    assert validator.problem(arrays, nxt) is None


def test_restore_dtypes_rounds_a_float_median_of_integers() -> None:
    sent = _record(steps=np.array([0, 0], np.int64), w=np.zeros(1, np.float32))
    out = restore_dtypes(_record(steps=np.array([11.5, 12.6]), w=np.array([0.5], np.float64)), sent)
    assert out["steps"].numpy().dtype == np.int64 and out["steps"].numpy().tolist() == [12, 13]
    assert out["w"].numpy().dtype == np.float32


# ---- (c) ε of the cluster statistics, composed with site-side DP -------------------------------------------------
def _hand_epsilon(rdp_per_alpha: float, delta: float) -> float:
    """ε at δ by hand: a Gaussian mechanism of noise multiplier z has RDP α/(2z²) at order α, composition adds
    (so the total is α × `rdp_per_alpha`), converted with ε = min_α [RDP(α) + log(1 − 1/α) − log(δα)/(α − 1)]
    (Canonne, Kamath, Steinke 2020) over dp-accounting's default orders."""
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
    return min(a * rdp_per_alpha + np.log1p(-1 / a) - np.log(delta * a) / (a - 1) for a in orders if a > 1.01)


def test_cluster_sums_and_site_side_dp_compose_as_computed_by_hand() -> None:
    cfg = FederationConfig(local_dp_noise_multiplier=2.0, cluster_clip_norm=0.5, cluster_noise_std=1.5)
    z_clusters = 1.5 / (2 * 0.5)  # noise std over a slide's sensitivity (twice the clip)
    assert cluster_noise_multiplier(cfg) == pytest.approx(z_clusters)
    k = planned_cluster_releases(cfg)
    assert k == 1 + cfg.rounds.cluster_iterations  # the local seeds and each Lloyd iteration
    r = planned_releases(cfg)
    delta = cfg.dp_delta
    assert cluster_epsilon(cfg) == pytest.approx(_hand_epsilon(k / (2 * z_clusters**2), delta), rel=1e-9)
    both = r / (2 * (2.0 / 2) ** 2) + k / (2 * z_clusters**2)  # site-side weights: σ/2 relative to 2·clip
    assert slide_epsilon_against_coordinator(cfg) == pytest.approx(_hand_epsilon(both, delta), rel=1e-9)
    # composing is the same as one Gaussian release of the combined noise multiplier
    z_eff = (r / 1.0**2 + k / z_clusters**2) ** -0.5
    assert composed_epsilon([(1.0, r), (z_clusters, k)], delta) == pytest.approx(
        composed_epsilon([(z_eff, 1)], delta), rel=1e-9
    )
    assert cluster_epsilon(cfg) < slide_epsilon_against_coordinator(cfg)

    report = privacy_report(cfg, None)
    clusters = report["cluster_statistics"]
    assert clusters["enabled"] and clusters["releases_per_site"] == k
    assert clusters["epsilon"] == pytest.approx(cluster_epsilon(cfg))
    assert "counts are exact" in clusters["trust_model"] and "size-constrained" in clusters["trust_model"]
    assert report["against_coordinator"]["slide_level"]["epsilon"] == pytest.approx(
        slide_epsilon_against_coordinator(cfg)
    )
    assert "metrics" in report["not_covered"] and "no noise" in report["not_covered"]


def test_unclipped_or_unnoised_cluster_sums_have_no_epsilon() -> None:
    for cfg in (
        FederationConfig(cluster_noise_std=1.0),  # not clipped
        FederationConfig(cluster_clip_norm=1.0),  # no noise
    ):
        assert cluster_noise_multiplier(cfg) == 0.0 and cluster_epsilon(cfg) == float("inf")
        report = privacy_report(cfg.model_copy(update={"local_dp_noise_multiplier": 1.0}), None)
        assert (
            report["cluster_statistics"]["epsilon"] is None and "differencing" in report["cluster_statistics"]["note"]
        )
        assert report["against_coordinator"]["slide_level"]["epsilon"] is None  # the sums go out without noise
    no_experts = FederationConfig(cluster_clip_norm=1.0, cluster_noise_std=1.0, kd={"lambda_expert": 0.0})
    assert planned_cluster_releases(no_experts) == 0 and cluster_epsilon(no_experts) == 0.0
    # site-side DP off: the coordinator sees exact weight updates, whatever the cluster noise
    off = FederationConfig(cluster_clip_norm=1.0, cluster_noise_std=1.0)
    assert privacy_report(off, None)["against_coordinator"]["slide_level"]["epsilon"] is None
