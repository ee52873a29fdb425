"""The records of messages between ServerApp and ClientApp, and the Facts every message carries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, MetricRecord

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


def metric_record(values: Mapping[str, float]) -> MetricRecord:
    """A MetricRecord of scalar metrics (ints stay ints)."""
    return MetricRecord({key: value for key, value in values.items()})


def number(record: Mapping[str, object], key: str, default: float | None = None) -> float:
    """A numeric value of a config or metric record (`default` when absent, if given), or a TypeError naming the
    key and what it holds."""
    if default is not None and key not in record:
        return default
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"record key {key!r}: expected a number, got {type(value).__name__} {value!r:.80}")
    return value


def integer(record: Mapping[str, object], key: str) -> int:
    """An integer value of a config or metric record (a whole float is accepted)."""
    value = number(record, key)
    if value != int(value):
        raise TypeError(f"record key {key!r}: expected an integer, got {value!r}")
    return int(value)


def strings(record: Mapping[str, object], key: str) -> list[str]:
    """A list-of-strings value of a config record."""
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"record key {key!r}: expected a list of strings, got {value!r:.80}")
    return [str(v) for v in value]


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
        return {
            "classes": list(self.classes),
            "feature-dim": self.feature_dim,
            "token-grid": self.token_grid,
            "child-grid": self.child_grid,
            "encoder-name": self.encoder_name,
        }

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "Facts":
        """Read back from a message's config record."""
        return cls(
            classes=tuple(strings(config, "classes")),
            feature_dim=integer(config, "feature-dim"),
            token_grid=integer(config, "token-grid"),
            child_grid=integer(config, "child-grid"),
            encoder_name=str(config["encoder-name"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (checkpoints)."""
        return {**self.to_config(), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Facts":
        """From `to_dict`."""
        return cls(
            tuple(data["classes"]),
            int(data["feature-dim"]),
            int(data["token-grid"]),
            int(data["child-grid"]),
            str(data["encoder-name"]),
        )
