"""Federated temperature scaling: each site sums its val slides' NLL over a fixed grid of temperatures
(`phases.TEMPERATURES`), the server picks the temperature of the least summed NLL over all sites.

Only scalars leave a site (phase `calibrate`); a grid rather than a fitted T, so the server's choice is the
pooled-data fit restricted to the grid, as the centralized `common.training.calibration.fit_temperature` is
(T >= 1) without sending logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedslide.common.federation import phases as ph


def nll_grid(logits: torch.Tensor, labels: np.ndarray) -> list[float]:
    """Summed cross-entropy of softmax(logits / T) against `labels`, for each T of the grid (float64)."""
    target = torch.as_tensor(labels, dtype=torch.int64)
    return [
        float(torch.nn.functional.cross_entropy(logits.double() / t, target, reduction="sum")) for t in ph.TEMPERATURES
    ]


def grid_metrics(model: str, logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """The calibrate reply's metrics of one model: `nll-<model>-<k>` for every grid index k."""
    return {ph.nll_metric(model, k): value for k, value in enumerate(nll_grid(logits, labels))}


def pick_temperature(replies: Sequence[Mapping[str, float | int]], model: str) -> float:
    """The grid temperature of the least NLL summed over the replies that counted val slides (1 when none did)."""
    totals = np.zeros(len(ph.TEMPERATURES))
    counted = 0
    for metrics in replies:
        if int(metrics.get(ph.VAL_N, 0)) <= 0:
            continue
        values = [metrics.get(ph.nll_metric(model, k)) for k in range(len(ph.TEMPERATURES))]
        if any(v is None or not np.isfinite(float(v)) or float(v) < 0 for v in values):
            continue  # an incomplete or invalid reply counts for nothing
        totals += np.asarray(values, dtype=np.float64)
        counted += 1
    return float(ph.TEMPERATURES[int(np.argmin(totals))]) if counted else 1.0
