"""The records of messages between ServerApp and ClientApp, and the Facts every message carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

# message types, config keys and metric names of each phase: common.federation.phases
CONFIG = "config"  # ConfigRecord of every server message
ARRAYS = "arrays"  # ArrayRecord of a model (Flower strategies' key)
METRICS = "metrics"  # MetricRecord of every reply
SITE = "site"  # ConfigRecord of the handshake reply
STATS = "stats"  # ArrayRecord of cluster sums/counts
LOGITS_RECORD = "logits"  # ArrayRecord of logits on the proxy cohort

# ArrayRecords the server sends alongside (never sent back)
TEACHER = "teacher"
EXPERTS = "experts"
ADAPTER = "adapter"
STUDENT = "student"
BASELINE = "baseline"
CENTROIDS = "centroids"
PROXY = "proxy"


@dataclass(frozen=True)
class Facts:
    """What the handshake established for the whole federation (sent in every message's config)."""

    classes: tuple[str, ...]
    feature_dim: int
    token_grid: int
    child_grid: int
    encoder_name: str

    def to_config(self) -> dict[str, Any]:
        """Config-record entries."""
        return {"classes": list(self.classes), "feature-dim": self.feature_dim, "token-grid": self.token_grid,
                "child-grid": self.child_grid, "encoder-name": self.encoder_name}

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "Facts":
        """Read back from a message's config record."""
        return cls(classes=tuple(str(c) for c in config["classes"]), feature_dim=int(config["feature-dim"]),
                   token_grid=int(config["token-grid"]), child_grid=int(config["child-grid"]),
                   encoder_name=str(config["encoder-name"]))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (checkpoints)."""
        return {**self.to_config(), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Facts":
        """From `to_dict`."""
        return cls(tuple(data["classes"]), int(data["feature-dim"]), int(data["token-grid"]), int(data["child-grid"]),
                   str(data["encoder-name"]))
