"""Per-feature standardisation of instances: statistics fitted on a training split, stored with the model."""

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


def fit_stats(cohort: Cohort, indices: Sequence[int] | np.ndarray, clip: float | None = None) -> FeatureStats:
    """Instance-level mean and std (population) over every instance of the cohort's slides `indices`; `clip`
    is stored with them (see FeatureStats.apply)."""
    total = np.zeros(cohort.feature_dim, dtype=np.float64)
    squares = np.zeros(cohort.feature_dim, dtype=np.float64)
    count = 0
    for index in indices:
        features, _ = cohort.load(int(index))
        x = features.astype(np.float64, copy=False)
        total += x.sum(0)
        squares += np.square(x).sum(0)
        count += x.shape[0]
    if count == 0:
        raise ValueError("cannot fit standardisation statistics on no instances")
    mean = total / count
    var = np.maximum(squares / count - np.square(mean), 0.0)
    std = np.sqrt(var)
    std[std < MIN_STD] = 1.0
    return FeatureStats(mean=mean.astype(np.float32), std=std.astype(np.float32), count=count, clip=clip)


def standardize_enabled(mode: StandardizeMode, encoder_attrs: Mapping[str, Any]) -> bool:
    """'on'/'off' as given; 'auto': on unless every feature file names its encoder (KNOWN_ENCODER_ATTR)."""
    if mode != "auto":
        return mode == "on"
    return not encoder_attrs.get(KNOWN_ENCODER_ATTR)
