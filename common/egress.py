"""What may leave a site, phase by phase, and the ledger of everything that did (`egress.jsonl`).

The ClientApp calls `check_reply` on every outgoing message before it is sent and refuses to send
anything the policy does not list: model parameter arrays shaped exactly like the model the server
sent, logits on the proxy cohort, per-cluster sums and counts (finite, of the expected shapes), metrics
with known names holding finite scalars, and, in the handshake, config strings of bounded length from a
safe character set. A reply larger than its phase's byte cap (`Phase.reply_cap`) is refused too. A
failure leaves as an error reply with an `ErrorCode` and its fixed message only; its text stays in the
site's log. Every reply, error replies included, is one hash-chained line of the ledger (`common.ledger`).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from fedslide.common.federation import phases as ph
from fedslide.common.flower_compat import error_to_proto, recorddict_to_proto
from fedslide.common.ledger import ChainBreak, HashChain

# the allow-list, phase by phase, as `common.federation.phases` declares it
WEIGHT_PHASES = tuple(phase.name for phase in ph.WEIGHTS)  # the teacher phase carries the baseline too
QUERY_PHASES = tuple(phase.name for phase in ph.ALL if not phase.is_weights)
PHASES = tuple(ph.BY_NAME)
METRIC_NAMES: dict[str, tuple[str, ...]] = {phase.name: phase.metrics for phase in ph.ALL}  # full-match regexes
HANDSHAKE_KEYS = ph.HANDSHAKE.reply_config_keys


class EgressViolation(RuntimeError):
    """An outgoing message holds something the egress policy does not allow; it is not sent."""


class ErrorCode(IntEnum):
    """Why a site's step failed, as its error reply says (Flower's own error codes are below 100)."""

    INTERNAL = 100
    SITE_CONFIG = 101
    SITE_DATA = 102
    RUN_REQUEST = 103
    EGRESS_REFUSED = 104
    PRIVACY_FLOOR = 105
    CODE_REFUSED = 106
    RESOURCES = 107

    @property
    def label(self) -> str:
        """The code's name as written in replies and ledgers (`site-data`)."""
        return self.name.lower().replace("_", "-")


# the fixed text of each error reply: nothing from the site's exception ever leaves
ERROR_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INTERNAL: "the site step failed",
    ErrorCode.SITE_CONFIG: "the site's node configuration is unusable (site-dir, runs-dir or run id)",
    ErrorCode.SITE_DATA: "the site's labels, splits or feature files cannot be used for this run",
    ErrorCode.RUN_REQUEST: "the run's configuration or the server's message cannot be used at this site",
    ErrorCode.EGRESS_REFUSED: "the reply would carry what the site's egress policy does not allow",
    ErrorCode.PRIVACY_FLOOR: "the run asks for less privacy than the site's floors allow",
    ErrorCode.CODE_REFUSED: "the run's app code is not code this site runs",
    ErrorCode.RESOURCES: "the site ran out of memory or another resource",
}


MAX_DETAIL = 1000  # characters of a refusal's own text an error reply may carry


def error_reason(code: ErrorCode, detail: str | None = None) -> str:
    """The fixed reason an error reply of this code carries, and `detail` (at most MAX_DETAIL characters): text
    made only of the coordinator's request and the site's policy, never of site data (a privacy floor's reason)."""
    reason = f"fedslide error {int(code)} {code.label}: {ERROR_MESSAGES[code]}"
    return f"{reason}: {detail[:MAX_DETAIL]}" if detail else f"{reason} (details in the site's log)"


def error_of(code: ErrorCode, detail: str | None = None) -> Error:
    """The error a site sends for `code`: the code, its fixed reason and any `detail` (see `error_reason`)."""
    return Error(code=int(code), reason=error_reason(code, detail))


@dataclass(frozen=True)
class ArraySpec:
    """Name, shape and dtype an outgoing array must have."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Raw bytes of an array of this spec."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass
class Allowed:
    """What one reply may carry beyond its phase's declaration: arrays under `array_record` (the declared record)
    exactly as in `arrays`, and `members` packed models (for the byte cap). Metric names, config values and the
    byte allowance come from the declaration alone."""

    phase: str
    array_record: str | None = None
    arrays: dict[str, ArraySpec] = field(default_factory=dict)
    members: int = 0

    @property
    def max_bytes(self) -> int:
        """The byte cap of the reply: its phase's `reply_cap` for these arrays and members."""
        return ph.by_name(self.phase).reply_cap(sum(spec.nbytes for spec in self.arrays.values()), self.members)


def specs_of(record: ArrayRecord) -> dict[str, ArraySpec]:
    """The names, shapes and dtypes of an ArrayRecord (e.g. the global model the server sent)."""
    return {name: ArraySpec(tuple(int(s) for s in array.shape), str(array.dtype)) for name, array in record.items()}


def weights_reply(phase: str, received: ArrayRecord) -> Allowed:
    """A weights phase: the same arrays (names, shapes, dtypes) as the model the server sent."""
    members = {name.split(".", 1)[0] for name in received if "." in name}
    return Allowed(phase, ph.by_name(phase).reply_arrays, specs_of(received), len(members))


def arrays_reply(phase: str, arrays: dict[str, ArraySpec]) -> Allowed:
    """A phase whose reply carries arrays of known shapes under its declared record (statistics, logits)."""
    return Allowed(phase, ph.by_name(phase).reply_arrays, arrays)


def _array_problems(record: ArrayRecord, declared: ph.Phase, allowed: Allowed) -> list[str]:
    phase = declared.name
    problems: list[str] = []
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
        elif np.dtype(got[key].dtype).kind == "f" and not np.isfinite(record[key].numpy()).all():
            problems.append(f"array {key!r} holds non-finite values (NaN/Inf)")
    return problems


def _metric_problems(record: MetricRecord, declared: ph.Phase) -> list[str]:
    problems: list[str] = []
    bad = [k for k in record if not declared.allows_metric(k)]
    if bad:
        problems.append(f"metric names not allowed in phase {declared.name}: {', '.join(sorted(bad)[:5])}")
    for key, value in record.items():
        if isinstance(value, list):
            problems.append(f"metric {key!r} is a list of {len(value)} values; only finite scalars may leave")
        elif not math.isfinite(float(value)):
            problems.append(f"metric {key!r} is {value}; only finite scalars may leave")
    return problems


def _config_problems(name: str, record: ConfigRecord, declared: ph.Phase) -> list[str]:
    if name != declared.reply_config:
        return [f"config record {name!r} is not allowed in phase {declared.name}"]
    if not set(record) <= declared.reply_config_keys:
        return [f"config keys not allowed: {', '.join(sorted(set(record) - declared.reply_config_keys))}"]
    problems = []
    for key, value in record.items():
        rule = declared.config_value(key)
        problem = rule.problem(key, value) if rule is not None else f"config {key!r} has no declared values"
        if problem:
            problems.append(problem)
    return problems


def check_reply(content: RecordDict, allowed: Allowed) -> None:
    """Raise EgressViolation unless `content` holds only what its phase's declaration and `allowed` list: declared
    arrays of the allowed shapes (floats finite), finite scalar metrics of declared names, declared config values,
    all within the phase's byte cap."""
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
            problems.extend(_array_problems(record, declared, allowed))
        elif isinstance(record, MetricRecord):
            problems.extend(_metric_problems(record, declared))
        elif isinstance(record, ConfigRecord):
            problems.extend(_config_problems(name, record, declared))
        else:  # pragma: no cover - RecordDict holds only the three kinds
            problems.append(f"record {name!r} of type {type(record).__name__} is not allowed")
    size, cap = message_bytes(content), allowed.max_bytes
    if size > cap:
        problems.append(
            f"the reply is {size} bytes, over the phase's cap of {cap} (its arrays' bytes x {ph.ARRAY_SLACK} "
            f"+ {declared.reply_allowance} + {ph.MEMBER_ALLOWANCE} per packed model)"
        )
    if problems:
        raise EgressViolation(f"refusing to send the {phase} reply: " + "; ".join(problems))


def message_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content (what goes over the wire, before transport framing)."""
    return int(recorddict_to_proto(content).ByteSize())


def message_sha256(content: RecordDict | Error) -> str:
    """Hex SHA-256 of a message's content (or error) as Flower serializes it (deterministic protobuf)."""
    proto = error_to_proto(content) if isinstance(content, Error) else recorddict_to_proto(content)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


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
    """Append-only, hash-chained JSON-lines record of every message a site sent (`<site>/runs/<run_id>/egress.jsonl`):
    per line the phase, round, bytes, arrays (names, shapes, dtypes, bytes), metric and config keys, error replies'
    codes, the SHA-256 of the serialized message (`sha256`), of the previous line (`prev`) and of the line itself
    (`entry`); optionally mirrored to syslog (`syslog`: `/dev/log` or `host:port`)."""

    def __init__(self, path: Path | str, syslog: str | None = None):
        self.path = Path(path)
        self.chain = HashChain(self.path, syslog)

    def append(
        self, phase: str, server_round: int, content: RecordDict, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write one line for an outgoing message and return it."""
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "phase": phase,
            "round": int(server_round),
            "bytes": message_bytes(content),
            "sha256": message_sha256(content),
            **describe(content),
            **dict(extra or {}),
        }
        return self.chain.append(entry)

    def append_error(self, phase: str, server_round: int, error: Error) -> dict[str, Any]:
        """Write one line for an outgoing error reply (its code and fixed reason) and return it."""
        code = ErrorCode(error.code) if error.code in ErrorCode._value2member_map_ else None
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "phase": phase,
            "round": int(server_round),
            "bytes": int(error_to_proto(error).ByteSize()),
            "sha256": message_sha256(error),
            "arrays": [],
            "metrics": [],
            "configs": [],
            "error": {"code": int(error.code), "name": code.label if code else "flower", "reason": error.reason},
        }
        return self.chain.append(entry)

    def entries(self) -> list[dict[str, Any]]:
        """Every line written so far."""
        return self.chain.entries()

    def verify(self) -> ChainBreak | None:
        """The first line where the ledger's hash chain breaks, or None when it verifies."""
        return self.chain.verify()
