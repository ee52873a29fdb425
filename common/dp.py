"""Accounting of site-side (local) differential privacy, shared by the site (which enforces its budget) and the
server (which reports it).

A site clips its update (reply minus the global model it received) to L2 norm C and adds N(0, (σ·C)²) to every
coordinate before the update leaves. The coordinator sees only that noised update, so the guarantee holds against
the coordinator too. Neighbouring inputs are any two data sets of the site: their clipped updates differ by at most
2·C, so each release is a Gaussian mechanism of noise multiplier σ/2 relative to that sensitivity, composed over
the site's releases with dp-accounting's RDP accountant (no sampling amplification).
"""

from __future__ import annotations

from fedslide.common.config.federation import FederationConfig


def site_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε at `delta` after `releases` site-side releases of noise multiplier `noise_multiplier` (σ/C); inf when off."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    import dp_accounting  # only where ε is computed

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier / 2.0), releases)
    return float(accountant.get_epsilon(delta))


def planned_releases(cfg: FederationConfig) -> int:
    """How many weight updates each site sends in a run of `cfg` at most (one per round of every weights phase)."""
    rounds = cfg.rounds
    total = rounds.adapter + max(rounds.teacher, rounds.baseline)
    if cfg.kd.lambda_expert > 0:
        total += rounds.experts
    if cfg.mode == "weights":
        total += rounds.student
    return total
