"""Accounting of what a site releases under differential privacy, shared by the site (which enforces its budget) and
the server (which reports it).

Weights (site-side DP): a site clips its update (reply minus the global model it received) to L2 norm C and adds
N(0, (σ·C)²) to every coordinate before the update leaves. The coordinator sees only that noised update, so the
guarantee holds against the coordinator too. Neighbouring inputs are any two data sets of the site: their clipped
updates differ by at most 2·C, so each release is a Gaussian mechanism of noise multiplier σ/2 relative to that
sensitivity, composed over the site's releases with dp-accounting's RDP accountant (no sampling amplification).

Cluster statistics: each slide's clustering vector is clipped to `cluster-clip-norm` c and every release of cluster
sums gets fresh N(0, s²) noise per coordinate (`cluster-noise-std` s). Neighbouring inputs differ in one slide: its
clipped vector moves one sum by at most 2·c (same cluster) or two sums by at most c each (√2·c), so each release is a
Gaussian mechanism of noise multiplier s/(2·c). The bound takes each slide's cluster to depend on its own vector only
(nearest centroid); the size-constrained assignment (`clusters.min-size-ratio`/`max-size-ratio`) can move other slides
too, which it does not bound. The cluster counts go out exact and are not covered (suppression only). A site-level
guarantee (weights) is also one for any one slide, so the slide-level ε against the coordinator composes both.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedslide.common.config.federation import FederationConfig


def composed_epsilon(mechanisms: Sequence[tuple[float, int]], delta: float) -> float:
    """ε at `delta` of the RDP composition of Gaussian mechanisms given as (noise multiplier relative to the
    sensitivity, number of releases); inf when any released mechanism has no noise, 0 when nothing is released."""
    used = [(z, n) for z, n in mechanisms if n > 0]
    if not used:
        return 0.0
    if any(z <= 0 for z, _ in used):
        return float("inf")
    import dp_accounting  # only where ε is computed

    accountant = dp_accounting.rdp.RdpAccountant()
    for z, n in used:
        accountant.compose(dp_accounting.GaussianDpEvent(z), n)
    return float(accountant.get_epsilon(delta))


def site_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε at `delta` after `releases` site-side releases of noise multiplier `noise_multiplier` (σ/C); inf when off."""
    return composed_epsilon([(noise_multiplier / 2.0, releases)], delta)


def planned_releases(cfg: FederationConfig) -> int:
    """How many weight updates each site sends in a run of `cfg` at most (one per round of every weights phase)."""
    rounds = cfg.rounds
    total = rounds.adapter + max(rounds.teacher, rounds.baseline)
    if cfg.kd.lambda_expert > 0:
        total += rounds.experts
    if cfg.mode == "weights":
        total += rounds.student
    return total


def planned_cluster_releases(cfg: FederationConfig) -> int:
    """How many releases of cluster sums each site makes in a run of `cfg` at most: the local k-means seeds and one
    per Lloyd iteration, when the run clusters at all (experts: kd.lambda-expert > 0)."""
    return 1 + cfg.rounds.cluster_iterations if cfg.kd.lambda_expert > 0 else 0


def cluster_noise_multiplier(cfg: FederationConfig) -> float:
    """Noise of the cluster sums relative to one slide's sensitivity, s / (2·c); 0 when unclipped or un-noised."""
    clip = cfg.cluster_clip_norm
    if clip is None or clip <= 0 or cfg.cluster_noise_std <= 0:
        return 0.0
    return cfg.cluster_noise_std / (2.0 * clip)


def cluster_epsilon(cfg: FederationConfig) -> float:
    """Slide-level ε at dp-delta of one site's planned cluster-sum releases (inf when unclipped or un-noised)."""
    return composed_epsilon([(cluster_noise_multiplier(cfg), planned_cluster_releases(cfg))], cfg.dp_delta)


def slide_epsilon_against_coordinator(cfg: FederationConfig) -> float:
    """Slide-level ε at dp-delta of everything noised that one site sends the coordinator: its site-side DP weight
    updates and its cluster sums, composed (inf when either goes out without noise)."""
    return composed_epsilon(
        [
            (cfg.local_dp_noise_multiplier / 2.0, planned_releases(cfg)),
            (cluster_noise_multiplier(cfg), planned_cluster_releases(cfg)),
        ],
        cfg.dp_delta,
    )
