"""What may leave a site, phase by phase, and the ledger of everything that did (`egress.jsonl`).

The ClientApp calls `check_reply` on every outgoing message before it is sent and refuses to send
anything the policy does not list: model parameter arrays shaped exactly like the model the server
sent, logits on the proxy cohort, per-cluster sums and counts, and metrics with known names. No
feature array, coordinate or slide identifier fits any of these.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedslide.common.federation import phases as ph
from fedslide.common.flower_compat import recorddict_to_proto

# the allow-list, phase by phase, as `common.federation.phases` declares it
WEIGHT_PHASES = tuple(phase.name for phase in ph.WEIGHTS)  # the teacher phase carries the baseline too
QUERY_PHASES = tuple(phase.name for phase in ph.ALL if not phase.is_weights)
PHASES = tuple(ph.BY_NAME)
METRIC_NAMES: dict[str, tuple[str, ...]] = {phase.name: phase.metrics for phase in ph.ALL}  # full-match regexes
HANDSHAKE_KEYS = ph.HANDSHAKE.reply_config_keys


class EgressViolation(RuntimeError):
    """An outgoing message holds something the egress policy does not allow; it is not sent."""


@dataclass(frozen=True)
class ArraySpec:
    """Name, shape and dtype an outgoing array must have."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class Allowed:
    """What one reply may carry beyond its phase's declaration: arrays under `array_record` (the declared record)
    exactly as in `arrays`. Metric names and the config record come from the declaration alone."""

    phase: str
    array_record: str | None = None
    arrays: dict[str, ArraySpec] = field(default_factory=dict)


def specs_of(record: ArrayRecord) -> dict[str, ArraySpec]:
    """The names, shapes and dtypes of an ArrayRecord (e.g. the global model the server sent)."""
    return {name: ArraySpec(tuple(int(s) for s in array.shape), str(array.dtype)) for name, array in record.items()}


def weights_reply(phase: str, received: ArrayRecord) -> Allowed:
    """A weights phase: the same arrays (names, shapes, dtypes) as the model the server sent."""
    return Allowed(phase, ph.by_name(phase).reply_arrays, specs_of(received))


def arrays_reply(phase: str, arrays: dict[str, ArraySpec]) -> Allowed:
    """A phase whose reply carries arrays of known shapes under its declared record (statistics, logits)."""
    return Allowed(phase, ph.by_name(phase).reply_arrays, arrays)


def check_reply(content: RecordDict, allowed: Allowed) -> None:
    """Raise EgressViolation unless `content` holds only what its phase's declaration and `allowed` list."""
    phase = allowed.phase
    if phase not in ph.BY_NAME:
        raise EgressViolation(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    declared = ph.BY_NAME[phase]
    problems: list[str] = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if name != declared.reply_arrays or name != allowed.array_record:
                problems.append(f"array record {name!r} is not allowed in phase {phase}")
                continue
            got = specs_of(record)
            undeclared = sorted(k for k in got if not declared.allows_array(k))
            extra = sorted(set(got) - set(allowed.arrays))
            missing = sorted(set(allowed.arrays) - set(got))
            if undeclared:
                problems.append(f"arrays not declared for phase {phase}: {', '.join(undeclared[:5])}")
            if extra:
                problems.append(f"arrays not allowed in phase {phase}: {', '.join(extra[:5])}")
            if missing:
                problems.append(f"arrays missing in phase {phase}: {', '.join(missing[:5])}")
            for key in sorted(set(got) & set(allowed.arrays)):
                if got[key] != allowed.arrays[key]:
                    problems.append(f"array {key!r} is {got[key]}, allowed only {allowed.arrays[key]}")
        elif isinstance(record, MetricRecord):
            bad = [k for k in record if not declared.allows_metric(k)]
            if bad:
                problems.append(f"metric names not allowed in phase {phase}: {', '.join(sorted(bad)[:5])}")
        elif isinstance(record, ConfigRecord):
            if name != declared.reply_config:
                problems.append(f"config record {name!r} is not allowed in phase {phase}")
            elif not set(record) <= declared.reply_config_keys:
                problems.append(
                    f"config keys not allowed: {', '.join(sorted(set(record) - declared.reply_config_keys))}"
                )
        else:  # pragma: no cover - RecordDict holds only the three kinds
            problems.append(f"record {name!r} of type {type(record).__name__} is not allowed")
    if problems:
        raise EgressViolation(f"refusing to send the {phase} reply: " + "; ".join(problems))


def message_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content (what goes over the wire, before transport framing)."""
    return int(recorddict_to_proto(content).ByteSize())


def describe(content: RecordDict) -> dict[str, Any]:
    """Ledger fields of a message: array names/shapes/dtypes/bytes, metric and config keys."""
    arrays: list[dict[str, Any]] = []
    metrics: list[str] = []
    configs: list[str] = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays.extend(
                {"record": name, "name": key, "shape": list(a.shape), "dtype": str(a.dtype), "bytes": len(a.data)}
                for key, a in record.items()
            )
        elif isinstance(record, MetricRecord):
            metrics.extend(f"{name}.{key}" for key in record)
        elif isinstance(record, ConfigRecord):
            configs.extend(f"{name}.{key}" for key in record)
    return {"arrays": arrays, "metrics": metrics, "configs": configs}


class EgressLedger:
    """Append-only JSON-lines record of every message a site sent (`<site>/runs/<run_id>/egress.jsonl`)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def append(
        self, phase: str, server_round: int, content: RecordDict, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write one line for an outgoing message and return it."""
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "phase": phase,
            "round": int(server_round),
            "bytes": message_bytes(content),
            **describe(content),
            **dict(extra or {}),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every line written so far."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
