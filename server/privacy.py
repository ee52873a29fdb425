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

TRUST_MODEL = (
    "central DP: each site's update is clipped to dp-clipping-norm and Gaussian noise is added to the "
    "aggregate at the server, so the released global models bound what they reveal about any one site "
    "(site-level, add-or-remove-one neighbouring, no sampling amplification: every site joins every round). "
    "The server itself sees the clipped updates; metrics, validation losses and cluster statistics are "
    "not covered by ε."
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


def privacy_report(cfg: FederationConfig, accountant: RdpAccountant | None) -> dict[str, Any]:
    """What metrics.json says about DP: ε at δ, releases, noise, clipping, the trust model."""
    if accountant is None:
        return {"enabled": False, "cluster_noise_std": cfg.cluster_noise_std}
    spent = accountant.get_privacy_spent()
    return {
        "enabled": True,
        "epsilon": spent.epsilon,
        "delta": spent.delta,
        "releases": spent.num_releases,
        "accounting": spent.accounting_method,
        "noise_multiplier": cfg.dp_noise_multiplier,
        "clipping_norm": cfg.dp_clipping_norm,
        "cluster_noise_std": cfg.cluster_noise_std,
        "trust_model": TRUST_MODEL,
    }
