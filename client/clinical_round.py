"""A site's local round of the federated clinical (BD) phase: train the global BD model on the site's student
instances and clinical rows, and reply with exactly its arrays and counts (`common.federation.clinical_phase`).

The clinical normalisation comes from the handshake's suppressed sums (`common.federation.clinical_sums`), pooled
at the server; a site without clinical data trains the single-modal branch and the prompt only and reports
`n-clinical` = 0, so its `multi.` arrays weigh nothing in the average.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedslide.common.clinical import encode, present_mask
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.distillation.clinical_model import build_bd
from fedslide.common.distillation.clinical_stage import train_bd
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.clinical_phase import N_CLINICAL, bd_record, check_clinical_reply, load_bd_record
from fedslide.common.models.bimodal import BidirectionalMIL, bd_losses
from fedslide.common.training.standardize import FeatureStats


@dataclass(frozen=True)
class SiteClinicalData:
    """A site's training slides for the BD phase: student-instance bags, labels and raw clinical vectors (NaN rows:
    no clinical data)."""

    bags: Sequence[np.ndarray]
    labels: np.ndarray
    raw: np.ndarray

    @property
    def with_clinical(self) -> int:
        """Training slides with a complete clinical row."""
        return int(present_mask(self.raw).sum())


@torch.no_grad()
def mean_loss(model: BidirectionalMIL, data: SiteClinicalData, stats: FeatureStats, cfg: ClinicalConfig) -> float:
    """Mean BD loss (eval mode) over the slides of `data`."""
    model.eval()
    z, present = encode(data.raw, stats)
    total = 0.0
    for i, bag in enumerate(data.bags):
        out = model(
            torch.from_numpy(bag)[None], None, torch.from_numpy(z[i : i + 1]), torch.from_numpy(present[i : i + 1])
        )
        y = torch.as_tensor(data.labels[i : i + 1], dtype=torch.long)
        total += float(bd_losses(out, y, cfg.temperature, cfg.weight_m2s, cfg.weight_s2m)["total"])
    return total / max(len(data.bags), 1)


def clinical_round(
    sent: ArrayRecord,
    data: SiteClinicalData,
    stats: FeatureStats,
    cfg: ClinicalConfig,
    in_dim: int,
    num_classes: int,
    seed: int,
) -> RecordDict:
    """One local round (`cfg.epochs` epochs from the global model `sent`) and the reply it releases, checked
    against the phase's declaration: the BD arrays, `num-examples`, `n-clinical`, `train-loss`, `seconds`."""
    start = time.perf_counter()
    model = build_bd(in_dim, cfg, num_classes)
    load_bd_record(model, sent)
    train_bd(model, data.bags, data.labels, data.raw, stats, cfg, seed)
    arrays = bd_record(model)
    metrics = MetricRecord(
        {
            ph.NUM_EXAMPLES: len(data.bags),
            N_CLINICAL: data.with_clinical,
            ph.TRAIN_LOSS: mean_loss(model, data, stats, cfg),
            ph.SECONDS: time.perf_counter() - start,
        }
    )
    check_clinical_reply(set(sent.keys()), set(arrays.keys()), set(metrics.keys()))
    return RecordDict({p.ARRAYS: arrays, p.METRICS: metrics})
