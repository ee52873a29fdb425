"""Strategy wrappers in Flower's style: PhaseStrategy wraps any Flower strategy (FedAvg, FedProx, FedMedian, ...).

PhaseStrategy adds the phase's extra records to every outgoing message, rejects invalid updates
before the wrapped strategy aggregates them (UpdateValidator), fails a round with fewer valid
replies than the configured minimum, returns every aggregated array in the dtype of the model it sent
(`restore_dtypes`), and tracks the validation loss of every global model so the
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
from flwr.serverapp.strategy import FedAvg, FedTrimmedAvg, Strategy

from fedslide.common.federation import phases as ph
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
class RoundError:
    """A round whose aggregation released no new global model (the previous round's model was kept)."""

    phase: str
    round: int
    reason: str


@dataclass
class UpdateValidator:
    """Checks a site's update against the global model it started from: names, shapes, dtypes, finiteness, norm."""

    max_update_norm: float | None = None  # absolute bound on ‖update − global‖₂
    norm_factor: float | None = 10.0  # relative bound: ≤ factor × median update norm of the round (≥ 3 replies)
    rejections: list[Rejection] = field(default_factory=list)
    round_errors: list[RoundError] = field(default_factory=list)  # rounds the wrapped strategy skipped

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
            self.reject(phase, server_round, node, reason)
        norms = [n for r, n in valid if not r.has_error()]
        if self.norm_factor is not None and len(norms) >= 3:
            bound = self.norm_factor * float(np.median(norms))
            kept = []
            for reply, norm in valid:
                if not reply.has_error() and bound > 0 and norm > bound:
                    self.reject(
                        phase,
                        server_round,
                        int(reply.metadata.src_node_id),
                        f"update norm {norm:.3g} exceeds {self.norm_factor:g} × the round's median ({bound:.3g})",
                    )
                else:
                    kept.append((reply, norm))
            valid = kept
        return [r for r, _ in valid]

    def reject(self, phase: str, server_round: int, node: int, reason: str) -> None:
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
    robust: bool = False  # judge a round by the median of the sites' losses (else their mean weighted by val-n)
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
            losses, counts = [], []
            for content in contents:
                metrics = next(iter(content.metric_records.values()), MetricRecord())
                n = p.number(metrics, group.n_key, 0.0)
                if n > 0 and group.loss_key in metrics and math.isfinite(p.number(metrics, group.loss_key)):
                    losses.append(p.number(metrics, group.loss_key))
                    counts.append(n)
            if not losses:
                continue
            loss = float(np.median(losses) if self.robust else np.average(losses, weights=counts))
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
        site_counts: dict[int, int] | None = None,
    ):
        self.site_counts = dict(site_counts or {})  # node -> training slides from the handshake
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
        if self.site_counts:
            valid = [r for r in valid if r.has_error() or self._weigh_by_handshake(server_round, r)]
        contents = [r.content for r in valid if not r.has_error()]
        # each site validated the model it received (the global model of the previous round) before training
        self.tracker.observe(self._round(server_round) - 1, self._sent, contents, _weighted_train_loss(contents))
        if len(contents) < self.min_replies:
            raise FederationError(
                f"phase {self.phase} round {self._round(server_round)}: {len(contents)} valid update(s) of "
                f"{len(replies)} repl(ies), fewer than min-nodes = {self.min_replies}"
            )
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        if arrays is not None:
            arrays = restore_dtypes(arrays, self._sent)
        if arrays is None:  # e.g. Flower's DP wrapper skips a round with an error reply or a missing site
            reason = (
                f"no global model released from {len(contents)} valid update(s) of {len(replies)} repl(ies) "
                f"({len(replies) - len(contents)} rejected or failed); the previous round's model was kept"
            )
            log.error("phase %s round %d: %s", self.phase, self._round(server_round), reason)
            self.validator.round_errors.append(RoundError(self.phase, self._round(server_round), reason))
        return arrays, metrics

    def _weigh_by_handshake(self, server_round: int, reply: Message) -> bool:
        """Set the reply's `num-examples` to the site's training slides from the handshake (what a site says per
        round is not trusted); a per-expert count outside [0, that] rejects the reply (False)."""
        node = int(reply.metadata.src_node_id)
        n_train = self.site_counts.get(node)
        metrics = next(iter(reply.content.metric_records.values()), None)
        reason = None
        if n_train is None or metrics is None:
            reason = "not a site admitted at the handshake" if n_train is None else "no metrics in the reply"
        else:
            for key in metrics:
                if key.startswith(ph.N_EXPERT + "-") or key == ph.N_CLINICAL:
                    value = p.number(metrics, key, -1.0)
                    if not (math.isfinite(value) and 0 <= value <= n_train):
                        reason = f"{key} = {value:g} outside [0, {n_train}] (its training slides at the handshake)"
                        break
        if reason is not None or metrics is None or n_train is None:
            self.validator.reject(self.phase, self._round(server_round), node, str(reason))
            return False
        metrics[ph.NUM_EXAMPLES] = int(n_train)
        metrics[ph.UNIT_WEIGHT] = 1  # equal weights under DP, whatever the site says
        return True

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._decorate(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


def restore_dtypes(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """`arrays` with each array in the dtype of the same-named array of `reference` (the global model sent). Flower's
    FedAvg, FedMedian and FedTrimmedAvg return float64 for integer arrays such as BatchNorm's `num_batches_tracked`;
    those are rounded to the nearest integer and cast back, so the next round's replies match the model's dtypes."""
    out: dict[str, Array] = {}
    for key, array in arrays.items():
        want = reference[key].numpy().dtype if key in reference else None
        a = array.numpy()
        if want is None or a.dtype == want:
            out[key] = array
            continue
        if np.issubdtype(want, np.integer) and not np.issubdtype(a.dtype, np.integer):
            a = np.rint(a)
        out[key] = Array(np.asarray(a.astype(want)))
    return ArrayRecord(out)


def trim_count(n: int, fraction: float) -> int:
    """Sites cut at each end by a trimmed mean of `n` values: `fraction` × n, at least one; FederationError when
    fewer than 2 × that + 1 sites are left to average."""
    k = max(1, int(fraction * n))
    if n < 2 * k + 1:
        raise FederationError(
            f"aggregation = 'trimmed-mean' (trim-fraction {fraction:g}) cuts {k} site(s) at each end and needs at "
            f"least {2 * k + 1} updates, got {n}; use aggregation = 'median' or more sites"
        )
    return k


def robust_combine(
    stack: np.ndarray, method: str, trim_fraction: float, weights: np.ndarray | None = None
) -> np.ndarray:
    """Combine per-site values stacked on axis 0: `mean` (weighted by `weights` when given), coordinate-wise
    `median`, or `trimmed-mean` (at least one site cut at each end, see trim_count)."""
    if method == "median":
        return np.median(stack, axis=0)
    if method == "trimmed-mean":
        k = trim_count(stack.shape[0], trim_fraction)
        return np.sort(stack, axis=0)[k : stack.shape[0] - k].mean(axis=0)
    if weights is None:
        return stack.mean(axis=0)
    w = weights.reshape(weights.shape + (1,) * (stack.ndim - weights.ndim))
    return (stack * w).sum(axis=0) / w.sum(axis=0)


class TrimmedMean(FedTrimmedAvg):
    """Flower's FedTrimmedAvg cutting at least one site at each end (its own cut, int(beta × n), is 0 for n < 1/beta);
    refuses a round with too few updates (trim_count)."""

    def __init__(self, trim_fraction: float, **kwargs: Any):
        super().__init__(beta=trim_fraction, **kwargs)
        self.trim_fraction = trim_fraction

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        n = sum(1 for r in replies if not r.has_error())
        if n:
            self.beta = (trim_count(n, self.trim_fraction) + 1e-6) / n  # Flower cuts int(beta × n) at each end
        return super().aggregate_train(server_round, replies)


class ExpertsFedAvg(FedAvg):
    """FedAvg of C packed experts (`expert-<c>.*`), expert c weighted by each site's `n-expert-<c>`; with a robust
    `method` (median, trimmed-mean) each expert is combined coordinate-wise over the sites that trained it."""

    def __init__(self, method: str = "mean", trim_fraction: float = 0.2, **kwargs: Any):
        super().__init__(**kwargs)
        self.method = method
        self.trim_fraction = trim_fraction

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
            used = [(sub, w) for sub, w in parts if w > 0]
            if self.method == "trimmed-mean" and len(used) < 3:
                raise FederationError(
                    f"experts: expert {c} was trained at {len(used)} site(s); aggregation = 'trimmed-mean' needs at "
                    "least 3 (use 'median' or fewer clusters)"
                )
            if self.method == "mean":
                records = [RecordDict({"a": sub, "m": MetricRecord({"w": w})}) for sub, w in used]
                merged.update(aggregate_arrayrecords(records, "w").items())
                continue
            for key in used[0][0]:
                stack = np.stack([sub[key].numpy() for sub, _ in used])
                combined = robust_combine(stack, self.method, self.trim_fraction)
                merged[key] = Array(np.asarray(combined, dtype=stack.dtype))
        return ArrayRecord(merged), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def train_config(base: dict[str, Any], **extra: Any) -> ConfigRecord:
    """A ConfigRecord of the base entries plus phase-specific ones."""
    return ConfigRecord({**base, **extra})


StrategyFactory = Callable[[], Strategy]
