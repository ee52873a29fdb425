"""Per-feature standardisation of instances: statistics fitted on a training split, stored with the model.

In a federation the statistics come from per-site sums: each site releases the sums, sums of squares and
instance count of its training bags' features (`site_feature_sums`), withheld as a whole (all zero) when it has
fewer than suppress-below training slides, by the same rule that withholds a small cluster's statistics
(`common.distillation.clustering.cluster_statistics`); the server pools them (`pooled_stats`) into the mean and
population sd that `fit_stats` gives on the union of the sites' training bags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedslide.common.training.cohort import Cohort

StandardizeMode = Literal["auto", "on", "off"]
KNOWN_ENCODER_ATTR = "encoder_name"  # written into every feature file by fedslide's extraction
MIN_STD = 1e-6  # features with a smaller spread are centred but not scaled


@dataclass(frozen=True)
class FeatureStats:
    """Mean and standard deviation of each feature dimension over the instances of the training bags."""

    mean: np.ndarray  # [D] float32
    std: np.ndarray  # [D] float32, >= MIN_STD (constant features get 1)
    count: int  # instances they were computed from
    clip: float | None = None  # standardised values are clamped to [-clip, clip] when set

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """(features - mean) / std on the last dimension (clamped to ±clip when set), in the features' dtype
        and device."""
        mean = torch.as_tensor(self.mean, dtype=features.dtype, device=features.device)
        std = torch.as_tensor(self.std, dtype=features.dtype, device=features.device)
        z = (features - mean) / std
        return z if self.clip is None else z.clamp(-self.clip, self.clip)

    def to_payload(self) -> dict[str, Any]:
        """Tensors and plain numbers only, so a weights-only checkpoint load reads it."""
        return {
            "mean": torch.from_numpy(self.mean.copy()),
            "std": torch.from_numpy(self.std.copy()),
            "count": self.count,
            "clip": self.clip,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any] | None) -> FeatureStats | None:
        """The statistics stored by to_payload, or None when a checkpoint carries none."""
        if not payload:
            return None
        mean = np.asarray(torch.as_tensor(payload["mean"]).numpy(), dtype=np.float32)
        std = np.asarray(torch.as_tensor(payload["std"]).numpy(), dtype=np.float32)
        if mean.shape != std.shape or mean.ndim != 1:
            raise ValueError(f"standardisation statistics have shapes {mean.shape} and {std.shape}; expected [D] each")
        clip = payload.get("clip")
        return cls(mean=mean, std=std, count=int(payload.get("count", 0)), clip=None if clip is None else float(clip))


@dataclass(frozen=True)
class FeatureSums:
    """Per-feature sums and sums of squares over `count` instances of `slides` bags (what a site releases)."""

    sums: np.ndarray  # [D] float64
    squares: np.ndarray  # [D] float64
    count: int  # instances
    slides: int  # bags

    @property
    def withheld(self) -> bool:
        """Whether these are a suppressed release (nothing counted)."""
        return self.slides == 0


def bag_sums(cohort: Cohort, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """One row per slide `indices`: [sum of its instances' features (D), sum of their squares (D), instances]."""
    rows = np.zeros((len(indices), 2 * cohort.feature_dim + 1), dtype=np.float64)
    for row, index in enumerate(indices):
        features, _ = cohort.load(int(index))
        x = features.astype(np.float64, copy=False)
        rows[row, : cohort.feature_dim] = x.sum(0)
        rows[row, cohort.feature_dim : -1] = np.square(x).sum(0)
        rows[row, -1] = x.shape[0]
    return rows


def site_feature_sums(cohort: Cohort, indices: Sequence[int] | np.ndarray, min_slides: int = 0) -> FeatureSums:
    """The sums of the cohort's slides `indices`; all zero (withheld) when there are fewer than `min_slides`
    of them: cluster statistics' suppression, with every slide in one cluster."""
    from fedslide.common.distillation.clustering import cluster_statistics  # lazy: it imports scikit-learn

    rows = bag_sums(cohort, indices)
    totals, counts = cluster_statistics(
        rows, np.zeros((1, rows.shape[1])), min_count=min_slides, assignment=np.zeros(len(rows), dtype=np.int64)
    )
    d = cohort.feature_dim
    return FeatureSums(totals[0, :d], totals[0, d : 2 * d], int(round(totals[0, -1])), int(counts[0]))


def pooled_stats(parts: Sequence[FeatureSums], clip: float | None = None) -> FeatureStats:
    """Mean and population sd over all instances the (not withheld) parts counted; `clip` stored with them."""
    counted = [part for part in parts if not part.withheld]
    count = sum(part.count for part in counted)
    if count == 0:
        raise ValueError(
            f"cannot fit standardisation statistics on no instances ({len(parts)} part(s), "
            f"{len(parts) - len(counted)} withheld)"
        )
    dims = {part.sums.shape for part in counted} | {part.squares.shape for part in counted}
    if len(dims) != 1:
        raise ValueError(f"feature sums of different shapes cannot be pooled: {sorted(dims)}")
    mean = np.sum([part.sums for part in counted], axis=0) / count
    squares = np.sum([part.squares for part in counted], axis=0)
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    std[std < MIN_STD] = 1.0
    return FeatureStats(mean=mean.astype(np.float32), std=std.astype(np.float32), count=count, clip=clip)


def fit_stats(cohort: Cohort, indices: Sequence[int] | np.ndarray, clip: float | None = None) -> FeatureStats:
    """Instance-level mean and std (population) over every instance of the cohort's slides `indices`; `clip`
    is stored with them (see FeatureStats.apply)."""
    return pooled_stats([site_feature_sums(cohort, indices)], clip)


def standardize_enabled(mode: StandardizeMode, encoder_attrs: Mapping[str, Any]) -> bool:
    """'on'/'off' as given; 'auto': on unless every feature file names its encoder (KNOWN_ENCODER_ATTR)."""
    if mode != "auto":
        return mode == "on"
    return not encoder_attrs.get(KNOWN_ENCODER_ATTR)
