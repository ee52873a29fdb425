"""What a trained model's inputs and logits go through at prediction: standardisation and temperature.

Stored beside the weights (a `fedslide train` checkpoint, a bundle's student.pt / teacher.pt) under the keys
`standardize` (FeatureStats.to_payload) and `temperature`; a payload without them gives the identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedslide.common.training.standardize import FeatureStats

STANDARDIZE_KEY = "standardize"
TEMPERATURE_KEY = "temperature"


@dataclass(frozen=True)
class ModelScaling:
    """Input standardisation (None: raw inputs) and logit temperature (1: unchanged) of one model."""

    stats: FeatureStats | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")

    @property
    def is_identity(self) -> bool:
        """Whether inputs and logits pass unchanged."""
        return self.stats is None and self.temperature == 1.0

    def inputs(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised instances [..., D]; padded positions (mask 0) stay zero, as in training batches."""
        if self.stats is None:
            return features
        z = self.stats.apply(features)
        return z if mask is None else z * mask.unsqueeze(-1).to(z.dtype)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / T) over the last dimension, in float64."""
        return torch.softmax(logits.double() / self.temperature, dim=-1)

    def to_payload(self) -> dict[str, Any]:
        """The `standardize` and `temperature` entries of a weights-only payload."""
        return {
            STANDARDIZE_KEY: None if self.stats is None else self.stats.to_payload(),
            TEMPERATURE_KEY: float(self.temperature),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ModelScaling:
        """The scaling a payload stores; the identity for missing or null entries."""
        temperature = payload.get(TEMPERATURE_KEY)
        return cls(
            stats=FeatureStats.from_payload(payload.get(STANDARDIZE_KEY)),
            temperature=1.0 if temperature is None else float(temperature),
        )
