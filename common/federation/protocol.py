"""The message vocabulary between ServerApp and ClientApp (message types, record and config keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

# message types (Flower: "<category>.<action>")
HANDSHAKE = "query.handshake"
CLUSTER_INIT = "query.cluster_init"
CLUSTER_STATS = "query.cluster_stats"
KD_CACHE = "query.kd_cache"
LOGITS = "query.logits"
TRAIN = "train"  # every weights phase; the phase is in the config record
EVALUATE = "evaluate"  # validation of a weights phase's global model, and the final push-back evaluation

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

FINAL = "final"  # phase name in the config of the final evaluation


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
