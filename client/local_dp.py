"""Site-side (local) differential privacy of a weights phase's reply, applied by the hospital's installed code.

The update (reply minus the global model the server sent) is clipped to `local-dp-clipping-norm` and Gaussian noise
of std `local-dp-noise-multiplier` × clip is added to every floating coordinate before the reply leaves, so ε holds
against the coordinator (accounting: `common.dp`). The noise comes from the operating system's entropy, never from
the run's seed, which the coordinator knows. Integer arrays (e.g. BatchNorm's batch counters) are sent back as
received: they would otherwise tell the site's batch count. Each site counts its own releases in
`runs/<run_id>/local_dp.json` and refuses an update that would take it past its node config's `max-local-epsilon`.
Flower's `LocalDpMod`/`fixedclipping_mod` do not fit here: they take the clip from the server's message (the
coordinator's choice), require one ArrayRecord per message and report a per-release ε without composition.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from fedslide.common.atomic import write_text_atomic
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.floors import SiteFloors, SiteRefusal
from fedslide.common.dp import site_epsilon

BUDGET_FILE = "local_dp.json"


def privatize(
    sent: ArrayRecord, reply: ArrayRecord, noise_multiplier: float, clipping_norm: float, rng: np.random.Generator
) -> tuple[ArrayRecord, float]:
    """`reply` with its update clipped to `clipping_norm` (L2 over all floating arrays) and N(0, (σ·clip)²) noise
    added; integer arrays are the received ones. Returns the new record and the update's norm before clipping."""
    deltas: dict[str, np.ndarray] = {}
    for key, array in reply.items():
        a = array.numpy()
        if np.issubdtype(a.dtype, np.floating):
            deltas[key] = a.astype(np.float64) - sent[key].numpy().astype(np.float64)
    norm = math.sqrt(sum(float((d**2).sum()) for d in deltas.values()))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clipping_norm
    out: dict[str, Array] = {}
    for key, array in reply.items():
        base = sent[key].numpy()
        if key in deltas:
            noised = base.astype(np.float64) + deltas[key] * scale + rng.normal(0.0, std, size=base.shape)
            out[key] = Array(np.asarray(noised, dtype=base.dtype))
        else:
            out[key] = Array(np.array(base, copy=True))
    return ArrayRecord(out), norm


@dataclass
class SiteBudget:
    """The site's own count of the site-side DP releases of one run (`runs/<run_id>/local_dp.json`)."""

    path: Path

    def releases(self) -> int:
        """Releases made so far in this run."""
        if not self.path.exists():
            return 0
        return int(json.loads(self.path.read_text())["releases"])

    def spend(self, cfg: FederationConfig, floors: SiteFloors) -> float:
        """Count one more release and return the ε it brings the site to; SiteRefusal (nothing counted) when that
        exceeds the site's `max-local-epsilon`."""
        count = self.releases() + 1
        eps = site_epsilon(cfg.local_dp_noise_multiplier, count, cfg.dp_delta)
        if floors.max_local_epsilon is not None and eps > floors.max_local_epsilon:
            raise SiteRefusal(
                "floor-local-epsilon",
                f"release {count} at local-dp-noise-multiplier = {cfg.local_dp_noise_multiplier} would spend "
                f"ε = {eps:.3g} against the coordinator, above this site's maximum of {floors.max_local_epsilon}",
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"releases": count, "noise_multiplier": cfg.local_dp_noise_multiplier, "epsilon": eps}
        write_text_atomic(self.path, json.dumps(state))
        return eps


def apply_local_dp(
    sent: ArrayRecord, reply: ArrayRecord, cfg: FederationConfig, floors: SiteFloors, run_dir: Path
) -> ArrayRecord:
    """The reply as it may leave the site: privatized and counted when `cfg` turns site-side DP on, else as is."""
    if cfg.local_dp_noise_multiplier <= 0:
        return reply
    SiteBudget(run_dir / BUDGET_FILE).spend(cfg, floors)
    record, _ = privatize(
        sent, reply, cfg.local_dp_noise_multiplier, cfg.local_dp_clipping_norm, np.random.default_rng()
    )
    return record
