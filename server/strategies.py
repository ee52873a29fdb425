"""Strategy wrappers in Flower's style: PhaseStrategy wraps any Flower strategy (FedAvg, FedProx, FedMedian, ...).

PhaseStrategy adds the phase's extra records to every outgoing message, rejects invalid updates
before the wrapped strategy aggregates them (UpdateValidator), fails a round with fewer valid
replies than the configured minimum, and tracks the validation loss of every global model so the
phase can keep its best round. ExpertsFedAvg averages each of the C packed experts by its own
slide counts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedslide.common.federation import protocol as p
from fedslide.common.flower_compat import aggregate_arrayrecords, checked_replies

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites, a phase without usable replies)."""


@dataclass
class Rejection:
    """An update that was not averaged in, and why."""

    phase: str
    round: int
    node: int
    reason: str


@dataclass
class UpdateValidator:
    """Checks a site's update against the global model it started from: names, shapes, dtypes, finiteness, norm."""

    max_update_norm: float | None = None  # absolute bound on ‖update − global‖₂
    norm_factor: float | None = 10.0  # relative bound: ≤ factor × median update norm of the round (≥ 3 replies)
    rejections: list[Rejection] = field(default_factory=list)

    def problem(self, sent: ArrayRecord, reply: ArrayRecord) -> str | None:
        """Why this update is invalid, or None."""
        if set(reply) != set(sent):
            return f"array names differ from the global model's (extra {sorted(set(reply) - set(sent))[:3]}, missing {sorted(set(sent) - set(reply))[:3]})"
        for key, array in reply.items():
            ref = sent[key]
            if tuple(array.shape) != tuple(ref.shape) or array.dtype != ref.dtype:
                return f"array {key!r} is {array.dtype}{tuple(array.shape)}, expected {ref.dtype}{tuple(ref.shape)}"
            if np.issubdtype(array.numpy().dtype, np.floating) and not np.isfinite(array.numpy()).all():
                return f"array {key!r} holds NaN/Inf"
        return None

    @staticmethod
    def update_norm(sent: ArrayRecord, reply: ArrayRecord) -> float:
        """‖reply − sent‖₂ over all floating arrays."""
        total = 0.0
        for key, array in reply.items():
            a = array.numpy()
            if np.issubdtype(a.dtype, np.floating):
                total += float(((a.astype(np.float64) - sent[key].numpy().astype(np.float64)) ** 2).sum())
        return math.sqrt(total)

    def filter(
        self, phase: str, server_round: int, sent: ArrayRecord, replies: list[Message], array_key: str = p.ARRAYS
    ) -> list[Message]:
        """The replies whose update is valid; the others are logged and remembered in `rejections`."""
        valid: list[tuple[Message, float]] = []
        for reply in replies:
            if reply.has_error():
                valid.append((reply, 0.0))  # error replies pass through: the wrapped strategy logs them
                continue
            node = int(reply.metadata.src_node_id)
            record = reply.content.array_records.get(array_key)
            reason = "no arrays in the reply" if record is None else self.problem(sent, record)
            if reason is None:
                norm = self.update_norm(sent, record)  # type: ignore[arg-type]
                if self.max_update_norm is not None and norm > self.max_update_norm:
                    reason = f"update norm {norm:.3g} exceeds max-update-norm {self.max_update_norm:.3g}"
                else:
                    valid.append((reply, norm))
                    continue
            self._reject(phase, server_round, node, reason)
        norms = [n for r, n in valid if not r.has_error()]
        if self.norm_factor is not None and len(norms) >= 3:
            bound = self.norm_factor * float(np.median(norms))
            kept = []
            for reply, norm in valid:
                if not reply.has_error() and bound > 0 and norm > bound:
                    self._reject(
                        phase,
                        server_round,
                        int(reply.metadata.src_node_id),
                        f"update norm {norm:.3g} exceeds {self.norm_factor:g} × the round's median ({bound:.3g})",
                    )
                else:
                    kept.append((reply, norm))
            valid = kept
        return [r for r, _ in valid]

    def _reject(self, phase: str, server_round: int, node: int, reason: str) -> None:
        log.warning("phase %s round %d: rejected the update of node %d: %s", phase, server_round, node, reason)
        self.rejections.append(Rejection(phase, server_round, node, reason))


@dataclass
class Group:
    """Arrays selected together (one model): their name prefix and the val metric keys that judge them."""

    prefix: str = ""
    loss_key: str = "val-loss"
    n_key: str = "val-n"


@dataclass
class BestRounds:
    """Validation loss of each global model per group; the best round's arrays are kept per group."""

    groups: dict[str, Group]
    best: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> {round, loss}
    arrays: dict[str, ArrayRecord] = field(default_factory=dict)  # group -> best arrays of that group
    history: list[dict[str, Any]] = field(default_factory=list)

    def observe(
        self, server_round: int, arrays: ArrayRecord, contents: list[RecordDict], train_loss: float | None = None
    ) -> None:
        """Record the validation replies about `arrays` (the global model after `server_round` rounds)."""
        entry: dict[str, Any] = {"round": server_round}
        if train_loss is not None:
            entry["train_loss"] = train_loss
        for name, group in self.groups.items():
            num = den = 0.0
            for content in contents:
                metrics = next(iter(content.metric_records.values()), MetricRecord())
                n = p.number(metrics, group.n_key, 0.0)
                if n > 0 and group.loss_key in metrics:
                    num += p.number(metrics, group.loss_key) * n
                    den += n
            if den <= 0:
                continue
            loss = num / den
            entry[f"val_loss{'_' + name if name else ''}"] = loss
            if name not in self.best or loss < self.best[name]["loss"]:
                self.best[name] = {"round": server_round, "loss": loss}
                self.arrays[name] = ArrayRecord({k: v for k, v in arrays.items() if k.startswith(group.prefix)})
        self.history.append(entry)

    def best_arrays(self, latest: ArrayRecord) -> ArrayRecord:
        """The best round's arrays of each group (the latest where a group was never validated)."""
        out = dict(latest.items())
        for name, record in self.arrays.items():
            out.update(record.items())
        return ArrayRecord(out)

    def state(self) -> dict[str, Any]:
        """JSON form (without arrays)."""
        return {"best": self.best, "history": self.history}

    def restore(self, state: dict[str, Any], best: ArrayRecord | None) -> None:
        """Back from `state` and the saved best arrays."""
        self.best, self.history = dict(state.get("best", {})), list(state.get("history", []))
        if best is not None:
            for name in self.best:
                prefix = self.groups[name].prefix
                self.arrays[name] = ArrayRecord({k: v for k, v in best.items() if k.startswith(prefix)})


def _weighted_train_loss(contents: list[RecordDict]) -> float | None:
    num = den = 0.0
    for content in contents:
        metrics = next(iter(content.metric_records.values()), MetricRecord())
        if "train-loss" in metrics and p.number(metrics, "num-examples", 0.0) > 0:
            num += p.number(metrics, "train-loss") * p.number(metrics, "num-examples")
            den += p.number(metrics, "num-examples")
    return num / den if den else None


class PhaseStrategy(Strategy):
    """One phase of the federation around a wrapped Flower strategy (see module docstring)."""

    def __init__(
        self,
        inner: Strategy,
        phase: str,
        tracker: BestRounds,
        validator: UpdateValidator,
        min_replies: int,
        extra: dict[str, ArrayRecord] | None = None,
        round_offset: int = 0,
    ):
        self.inner = inner
        self.phase = phase
        self.tracker = tracker
        self.validator = validator
        self.min_replies = min_replies
        self.extra = dict(extra or {})
        self.round_offset = round_offset
        self._sent: ArrayRecord | None = None

    def _round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def _decorate(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for message in out:
            for key, record in self.extra.items():
                message.content[key] = record
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        if hasattr(grid, "server_round"):
            grid.server_round = self._round(server_round)
        return self._decorate(self.inner.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._sent is not None
        replies = list(replies)
        valid = self.validator.filter(self.phase, self._round(server_round), self._sent, replies)
        contents = [r.content for r in valid if not r.has_error()]
        # each site validated the model it received (the global model of the previous round) before training
        self.tracker.observe(self._round(server_round) - 1, self._sent, contents, _weighted_train_loss(contents))
        if len(contents) < self.min_replies:
            raise FederationError(
                f"phase {self.phase} round {self._round(server_round)}: {len(contents)} valid update(s) of "
                f"{len(replies)} repl(ies), fewer than min-nodes = {self.min_replies}"
            )
        return self.inner.aggregate_train(server_round, valid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._decorate(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


class ExpertsFedAvg(FedAvg):
    """FedAvg of C packed experts (`expert-<c>.*`), expert c weighted by each site's `n-expert-<c>`."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = checked_replies(self, replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        record_key = next(iter(contents[0].array_records))
        prefixes = sorted({k.split(".", 1)[0] for k in contents[0][record_key]})
        merged: dict[str, Array] = {}
        for prefix in prefixes:
            c = int(prefix.removeprefix("expert-"))
            parts = []
            for content in contents:
                metrics = next(iter(content.metric_records.values()))
                weight = p.number(metrics, f"n-expert-{c}", 0.0)
                sub = ArrayRecord({k: v for k, v in content[record_key].items() if k.startswith(prefix + ".")})
                parts.append((sub, weight))
            if sum(w for _, w in parts) <= 0:  # no site trained this expert: keep what was sent (all replies equal it)
                parts = [(sub, 1.0) for sub, _ in parts]
            records = [RecordDict({"a": sub, "m": MetricRecord({"w": w})}) for sub, w in parts if w > 0]
            merged.update(aggregate_arrayrecords(records, "w").items())
        return ArrayRecord(merged), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def train_config(base: dict[str, Any], **extra: Any) -> ConfigRecord:
    """A ConfigRecord of the base entries plus phase-specific ones."""
    return ConfigRecord({**base, **extra})


StrategyFactory = Callable[[], Strategy]
