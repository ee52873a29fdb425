"""The hospital's privacy floors (node config) against the coordinator's run config, and cluster statistics that the
differencing of two k-means releases cannot turn back into one slide's embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedslide.client.client_app import app as client_app
from fedslide.client.site_run import SiteRun
from fedslide.common.config.base import ConfigError
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.floors import SiteFloors, SiteRefusal
from fedslide.common.distillation.clustering import released_statistics
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.server.local_grid import FIRST_NODE, LocalGrid
from tests.feature_sites import make_site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site(tmp_path_factory.mktemp("floors"), "site1", {"train": 4, "val": 2, "test": 2}, seed=1)


def _handshake(site: Path, node_config: dict[str, Any], cfg: FederationConfig) -> Message:
    """The site's reply to a handshake asked under run config `cfg`."""
    grid = LocalGrid(client_app, [{"site-dir": str(site), **node_config}], cfg.to_run_config())
    content = RecordDict({p.CONFIG: ConfigRecord({ph.RUN_ID: "floors", ph.PHASE: ph.HANDSHAKE.phase})})
    message = Message(content=content, dst_node_id=FIRST_NODE, message_type=ph.HANDSHAKE.message_type)
    (reply,) = grid.send_and_receive([message])
    return reply


def test_suppress_below_zero_against_a_floor_of_five_is_refused_at_the_handshake(
    site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = FederationConfig(run_id="floors", suppress_below=0)
    reply = _handshake(site, {"min-suppress-below": 5}, cfg)
    assert reply.has_error()
    assert "[floor-suppress-below]" in reply.error.reason and "floor of 5" in reply.error.reason
    assert "floor-suppress-below" in caplog.text  # logged at the site


def test_a_run_at_or_above_the_floors_is_answered(site: Path) -> None:
    cfg = FederationConfig(run_id="floors", suppress_below=5)
    reply = _handshake(site, {"min-suppress-below": 5, "allowed-modes": "weights"}, cfg)
    assert not reply.has_error()
    assert reply.content.config_records[p.SITE][ph.SITE_NAME] == "site1"


def test_require_dp_refuses_a_run_without_dp_and_logits_mode(site: Path, tmp_path: Path) -> None:
    reply = _handshake(site, {"require-dp": True}, FederationConfig(run_id="floors"))
    assert reply.has_error() and "[floor-require-dp]" in reply.error.reason
    logits = FederationConfig(run_id="floors", mode="logits", proxy_dir=tmp_path)
    reply = _handshake(site, {"require-dp": True}, logits)
    assert reply.has_error() and "floor-dp-logits" in reply.error.reason and "un-noised" in reply.error.reason


def test_dp_with_logits_mode_is_refused_by_the_run_config() -> None:
    with pytest.raises(ValueError, match="logits mode sends un-noised logits"):
        FederationConfig(mode="logits", proxy_dir=Path("proxy"), dp_noise_multiplier=1.0)


@pytest.mark.parametrize(
    ("floors", "run", "code"),
    [
        ({"allowed-modes": "weights"}, {"mode": "logits", "proxy_dir": Path("p")}, "floor-mode"),
        ({"max-epsilon": 4.0}, {"dp_noise_multiplier": 1.0}, "floor-max-epsilon"),  # no budget set
        ({"max-epsilon": 4.0}, {"dp_noise_multiplier": 1.0, "dp_max_epsilon": 8.0}, "floor-max-epsilon"),
        ({"max-epsilon": 4.0}, {}, "floor-max-epsilon"),  # DP off: ε unbounded
        ({"cluster-noise-multiplier": 1.0}, {"cluster_noise_std": 5.0}, "floor-cluster-noise"),  # not clipped
        (
            {"cluster-noise-multiplier": 1.0},
            {"cluster_clip_norm": 2.0, "cluster_noise_std": 1.0},
            "floor-cluster-noise",
        ),
        ({"min-suppress-below": 3}, {"clusters": {"suppress_below": 2}}, "floor-suppress-below"),
    ],
)
def test_each_floor_refuses_a_run_below_it(floors: dict[str, Any], run: dict[str, Any], code: str) -> None:
    with pytest.raises(SiteRefusal) as refused:
        SiteFloors.from_node_config(floors).check(FederationConfig(**run))
    assert refused.value.code == code


def test_runs_within_the_floors_pass() -> None:
    floors = SiteFloors.from_node_config(
        {
            "site-dir": "/x",  # not a floor: ignored here
            "min-suppress-below": 2,
            "require-dp": True,
            "max-epsilon": 8.0,
            "allowed-modes": "weights",
            "cluster-noise-multiplier": 1.0,
        }
    )
    assert floors.allowed_modes == ("weights",)
    cfg = FederationConfig(dp_noise_multiplier=1.0, dp_max_epsilon=8.0, cluster_clip_norm=2.0, cluster_noise_std=2.0)
    assert floors.violations(cfg) == []
    assert SiteFloors.from_node_config({}).violations(FederationConfig(suppress_below=0)) == []  # no floors set


def test_bad_floor_values_name_the_key_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match="allowed-modes") as bad:
        SiteFloors.from_node_config({"allowed-modes": "weights,federated"})
    assert "weights" in str(bad.value) and "logits" in str(bad.value)
    with pytest.raises(ConfigError, match="min-suppress-below"):
        SiteFloors.from_node_config({"min-suppress-below": -1})
    with pytest.raises(ConfigError, match="max-epsilon"):
        SiteFloors.from_node_config({"max-epsilon": 0})


def test_site_run_checks_the_floors_before_anything_else(site: Path) -> None:
    with pytest.raises(SiteRefusal, match="floor of 5"):
        SiteRun.from_node_config({"site-dir": str(site), "min-suppress-below": 5}, FederationConfig(), "r1")


# ---- the cluster differencing attack ----------------------------------------------------------------
def _difference_attack(clip_norm: float | None, noise_std: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two consecutive releases whose cluster 0 differs by one slide (the target): the coordinator subtracts the
    sums. Returns (recovered vector, the target's true vector)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(0.0, 1.0, size=(12, 32)) + 3.0  # every vector's norm well above the clip below
    centroids = np.stack([vectors[:6].mean(0), vectors[6:].mean(0)])
    before = np.array([0] * 6 + [1] * 6)
    after = before.copy()
    after[0] = 1  # the target slide moved from cluster 0 to cluster 1
    releases = [
        released_statistics(vectors, centroids, a, 2, clip_norm, noise_std, np.random.default_rng(seed + i + 1))
        for i, a in enumerate((before, after))
    ]
    (s1, n1), (s2, n2) = releases
    assert n1[0] - n2[0] == 1  # membership differs by exactly one slide, both above suppression
    return s1[0] - s2[0], vectors[0]


def _relative_error(recovered: np.ndarray, true: np.ndarray) -> float:
    return float(np.linalg.norm(recovered - true) / np.linalg.norm(true))


def test_differencing_two_releases_recovers_the_slide_exactly_without_the_defence() -> None:
    recovered, true = _difference_attack(clip_norm=None, noise_std=0.0)
    assert _relative_error(recovered, true) < 1e-9


def test_differencing_fails_with_clipping_and_noise_calibrated_to_the_clip() -> None:
    for seed in range(5):
        recovered, true = _difference_attack(clip_norm=1.0, noise_std=1.0, seed=seed)
        assert _relative_error(recovered, true) > 0.9  # no better than guessing zero
        # even knowing the clip, the recovered direction is mostly noise
        cosine = recovered @ true / (np.linalg.norm(recovered) * np.linalg.norm(true))
        assert cosine < 0.5


def test_noise_without_clipping_still_leaks_a_large_embedding() -> None:
    """Why the clip matters: unclipped, a vector large against the noise comes back nearly intact."""
    rng = np.random.default_rng(0)
    big = rng.normal(0.0, 1.0, size=(12, 32)) * 100.0
    centroids = np.stack([big[:6].mean(0), big[6:].mean(0)])
    before, after = np.array([0] * 6 + [1] * 6), np.array([1] + [0] * 5 + [1] * 6)
    gen = np.random.default_rng(1)
    s1, _ = released_statistics(big, centroids, before, 2, None, 1.0, gen)
    s2, _ = released_statistics(big, centroids, after, 2, None, 1.0, gen)
    assert _relative_error(s1[0] - s2[0], big[0]) < 0.05


def test_the_site_cluster_phase_clips_and_noises_every_release(site: Path, tmp_path: Path) -> None:
    from fedslide.client import local_phases

    rng = np.random.default_rng(0)
    embedding = torch.from_numpy(rng.normal(0.0, 1.0, size=(8, 16)).astype(np.float32) + 5.0)
    outputs = {"fingerprint": "t", "logits": torch.zeros(8, 2), "embedding": embedding}
    centroids = np.stack([embedding[:4].numpy().mean(0), embedding[4:].numpy().mean(0)]).astype(np.float64)

    def release(**cfg: Any) -> tuple[np.ndarray, np.ndarray]:
        run = SiteRun(site, tmp_path, FederationConfig(suppress_below=1, **cfg), "site1")
        run.save(local_phases.TEACHER_OUTPUTS, outputs)
        stats, _ = local_phases.cluster_stats(run, centroids, "t")
        return stats[ph.SUMS], stats[ph.COUNTS]

    sums, counts = release()
    assert np.linalg.norm(sums, axis=1).max() > 10.0  # unclipped: sums of vectors of norm ~20
    sums, counts = release(cluster_clip_norm=1.0)
    assert np.all(np.linalg.norm(sums, axis=1) <= counts + 1e-9)  # each slide contributes at most the clip
    first, _ = release(cluster_clip_norm=1.0, cluster_noise_std=1.0)
    second, _ = release(cluster_clip_norm=1.0, cluster_noise_std=1.0)
    assert not np.allclose(first, second)  # fresh noise on every release: repeats do not average it away
