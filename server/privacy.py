"""Central differential privacy of the weights phases: Flower's server-side fixed-clipping wrapper around FedAvg,
with one RDP accountant (Flower's, backed by dp-accounting) composing every release of the whole run; and the run's
privacy report: ε against third parties, against the coordinator (site-side DP, cluster sums) and what no ε covers."""

from __future__ import annotations

from typing import Any

from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)

from fedslide.common.config.federation import FederationConfig
from fedslide.common.dp import (
    cluster_epsilon,
    cluster_noise_multiplier,
    planned_cluster_releases,
    planned_releases,
    site_epsilon,
    slide_epsilon_against_coordinator,
)

TRUST_MODEL = (
    "central DP: each site's update is clipped to dp-clipping-norm and Gaussian noise is added to the "
    "aggregate at the server, so the released global models bound what they reveal about any one site "
    "(site-level, add-or-remove-one neighbouring, no sampling amplification: every site joins every round). "
    "The server itself sees the clipped updates; metrics, validation losses and cluster counts are not covered by ε."
)
LOCAL_TRUST_MODEL = (
    "site-side DP: each site clips its update to local-dp-clipping-norm and adds Gaussian noise before it leaves, "
    "so ε holds against the coordinator as well (neighbouring: any two data sets of one site, sensitivity twice the "
    "clip; RDP composition over the site's updates, no sampling amplification)."
)
CLUSTER_TRUST_MODEL = (
    "cluster sums: each slide's vector clipped to cluster-clip-norm, fresh Gaussian noise of cluster-noise-std on "
    "every release; slide-level (replace one slide: sensitivity twice the clip), RDP composition over the local "
    "k-means seeds and each Lloyd iteration. Assumes a slide's cluster depends on its own vector only (nearest "
    "centroid); the size-constrained assignment can move other slides too, which this does not bound. The cluster "
    "counts are exact: not covered (suppress-below only)."
)
NOT_COVERED = (
    "not covered by any ε: the sites' metrics (counts, class balance, training and validation losses, which also "
    "pick the best round; exact scalars with no noise, bounded only by the egress policy: finite scalars of declared "
    "names) and the cluster counts (exact, small ones withheld by suppress-below)"
)


def make_accountant(cfg: FederationConfig, num_sites: int, state: dict[str, Any] | None = None) -> RdpAccountant | None:
    """The run's accountant (None when DP is off); restored from a checkpoint `state` when given."""
    if cfg.dp_noise_multiplier <= 0:
        return None
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.dp_delta,
            population_size=num_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=cfg.dp_max_epsilon,
        )
    )
    if state:
        accountant.load_state_dict(state)
    return accountant


def dp_strategy(cfg: FederationConfig, num_sites: int, min_nodes: int, accountant: RdpAccountant) -> Strategy:
    """FedAvg (or FedProx) with equal site weights, wrapped by Flower's server-side fixed-clipping DP."""
    common: dict[str, Any] = {
        "fraction_evaluate": 0.0,
        "min_train_nodes": min_nodes,
        "min_available_nodes": min_nodes,
        "weighted_by_key": "unit-weight",
    }
    inner = FedProx(proximal_mu=cfg.proximal_mu, **common) if cfg.strategy == "fedprox" else FedAvg(**common)
    return DifferentialPrivacyServerSideFixedClipping(
        inner, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, num_sites, accountant=accountant
    )


def site_dp_report(cfg: FederationConfig) -> dict[str, Any]:
    """ε against the coordinator: site-side DP, each site's updates clipped and noised before they leave (the
    sites count and cap their own releases; this is the run's planned count, one update per weights round)."""
    if cfg.local_dp_noise_multiplier <= 0:
        return {"enabled": False, "epsilon": None, "note": "off: the coordinator sees every site's exact update"}
    releases = planned_releases(cfg)
    return {
        "enabled": True,
        "epsilon": site_epsilon(cfg.local_dp_noise_multiplier, releases, cfg.dp_delta),
        "delta": cfg.dp_delta,
        "releases_per_site": releases,
        "noise_multiplier": cfg.local_dp_noise_multiplier,
        "clipping_norm": cfg.local_dp_clipping_norm,
        "trust_model": LOCAL_TRUST_MODEL,
    }


def cluster_dp_report(cfg: FederationConfig) -> dict[str, Any]:
    """What the cluster sums reveal about one slide: their slide-level ε (to the coordinator, which alone receives
    them; the centroids it sends on are post-processing) or why there is none."""
    releases = planned_cluster_releases(cfg)
    base: dict[str, Any] = {
        "releases_per_site": releases,
        "clip_norm": cfg.cluster_clip_norm,
        "noise_std": cfg.cluster_noise_std,
    }
    if releases == 0:
        return {**base, "enabled": False, "epsilon": None, "note": "no clustering in this run (kd.lambda-expert = 0)"}
    if cluster_noise_multiplier(cfg) <= 0:
        note = "off: cluster-clip-norm and cluster-noise-std > 0 are needed; differencing releases exposes a slide"
        return {**base, "enabled": False, "epsilon": None, "note": note}
    return {
        **base,
        "enabled": True,
        "epsilon": cluster_epsilon(cfg),
        "delta": cfg.dp_delta,
        "noise_multiplier": cluster_noise_multiplier(cfg),
        "trust_model": CLUSTER_TRUST_MODEL,
    }


def privacy_report(cfg: FederationConfig, accountant: RdpAccountant | None) -> dict[str, Any]:
    """What metrics.json says about DP: the server-side (central) ε at δ with its releases, noise and clipping at the
    top level, and ε separately against third parties (either mechanism bounds it) and against the coordinator
    (site-side DP only)."""
    coordinator = site_dp_report(cfg)
    out: dict[str, Any] = {"enabled": accountant is not None, "cluster_noise_std": cfg.cluster_noise_std}
    central = None
    if accountant is not None:
        spent = accountant.get_privacy_spent()
        central = spent.epsilon
        out.update(
            {
                "epsilon": spent.epsilon,
                "delta": spent.delta,
                "releases": spent.num_releases,
                "accounting": spent.accounting_method,
                "noise_multiplier": cfg.dp_noise_multiplier,
                "clipping_norm": cfg.dp_clipping_norm,
                "trust_model": TRUST_MODEL,
            }
        )
    bounds = [e for e in (central, coordinator["epsilon"]) if e is not None]
    out["against_third_parties"] = {
        "epsilon": min(bounds) if bounds else None,
        "delta": cfg.dp_delta if bounds else None,
        "by": [
            name for name, e in (("server-side DP", central), ("site-side DP", coordinator["epsilon"])) if e is not None
        ],
    }
    clusters = cluster_dp_report(cfg)
    slide = slide_epsilon_against_coordinator(cfg)
    coordinator["slide_level"] = {  # everything noised a site sends, for any one of its slides
        "epsilon": slide if slide != float("inf") else None,
        "delta": cfg.dp_delta,
        "composes": ["site-side DP weight updates", "cluster sums"],
        "note": "None: the weight updates or the cluster sums reach the coordinator without noise"
        if slide == float("inf")
        else "site-side DP (site-level, hence also slide-level) composed with the cluster sums by one RDP accountant",
    }
    out["against_coordinator"] = coordinator
    out["cluster_statistics"] = clusters
    out["not_covered"] = NOT_COVERED
    return out
