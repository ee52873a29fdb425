"""Central differential privacy of the weights phases: Flower's server-side fixed-clipping wrapper around FedAvg,
with one RDP accountant (Flower's, backed by dp-accounting) composing every release of the whole run."""

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
from fedslide.common.dp import planned_releases, site_epsilon

TRUST_MODEL = (
    "central DP: each site's update is clipped to dp-clipping-norm and Gaussian noise is added to the "
    "aggregate at the server, so the released global models bound what they reveal about any one site "
    "(site-level, add-or-remove-one neighbouring, no sampling amplification: every site joins every round). "
    "The server itself sees the clipped updates; metrics, validation losses and cluster statistics are "
    "not covered by ε."
)
LOCAL_TRUST_MODEL = (
    "site-side DP: each site clips its update to local-dp-clipping-norm and adds Gaussian noise before it leaves, "
    "so ε holds against the coordinator as well (neighbouring: any two data sets of one site, sensitivity twice the "
    "clip; RDP composition over the site's updates, no sampling amplification)."
)
NOT_COVERED = (
    "not covered by either ε: the sites' metrics (counts, training and validation losses that pick the best round) "
    "and cluster counts; cluster sums only through cluster-clip-norm and cluster-noise-std"
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
    out["against_coordinator"] = coordinator
    out["not_covered"] = NOT_COVERED
    return out
