"""Egress by value (finite scalar metrics, bounded config strings, byte caps, finite logits), error replies that
carry a code and a fixed message only, and the hash-chained egress ledger that `fedslide audit` verifies."""

from __future__ import annotations

import json
import logging
import math
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedslide.client.client_app import app as client_app
from fedslide.client.client_app import error_code
from fedslide.client.site_run import RunIdError, SiteConfigError
from fedslide.common import egress
from fedslide.common.config.federation import FederationConfig
from fedslide.common.egress import Allowed, ArraySpec, EgressLedger, EgressViolation, ErrorCode, check_reply
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.ledger import GENESIS, sha256_text, verify_chain
from fedslide.common.training.errors import LabelsError
from fedslide.deploy import cli
from fedslide.server.local_grid import FIRST_NODE, LocalGrid
from tests.feature_sites import make_site


def _handshake_config(**changes: object) -> ConfigRecord:
    values: dict[str, Any] = {
        ph.SITE_NAME: "site1",
        ph.ENCODER_NAME: "hf-hub:MahmoodLab/UNI",
        ph.ENCODER_HASH: "f" * 64,
        ph.ENCODER_FINGERPRINT: "0" * 64,
        ph.CLASSES: ["neg", "pos"],
        **changes,
    }
    return ConfigRecord(values)


def _handshake(config: ConfigRecord, metrics: dict[str, float] | None = None) -> RecordDict:
    return RecordDict({p.SITE: config, p.METRICS: MetricRecord(metrics or {"n-train": 4, "encoder-dim": 8})})


# ---- egress by value ------------------------------------------------------------------------------------------


def test_a_metric_holding_a_list_of_floats_is_refused() -> None:
    """The issue's case: a metric named `seconds` holding 128,000 floats."""
    ok = RecordDict({p.METRICS: MetricRecord({ph.SECONDS: 1.5, ph.N_TRAIN: 4})})
    check_reply(ok, Allowed(ph.KD_CACHE.name))
    leak = RecordDict({p.METRICS: MetricRecord({ph.SECONDS: [0.25] * 128_000})})
    with pytest.raises(EgressViolation, match="'seconds' is a list of 128000 values") as refused:
        check_reply(leak, Allowed(ph.KD_CACHE.name))
    assert "over the phase's cap" in str(refused.value)  # and ~1 MB is far over the kd-cache reply's byte cap
    with pytest.raises(EgressViolation, match="is a list of 1 values"):  # even one value in a list
        check_reply(RecordDict({p.METRICS: MetricRecord({ph.SECONDS: [1.0]})}), Allowed(ph.KD_CACHE.name))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_is_refused(value: float) -> None:
    with pytest.raises(EgressViolation, match="only finite scalars"):
        check_reply(RecordDict({p.METRICS: MetricRecord({ph.VAL_LOSS: value})}), Allowed(ph.STUDENT.name))


def test_a_100kb_string_in_the_handshake_config_is_refused() -> None:
    """The issue's case; and each handshake value is a bounded string from a safe character set."""
    check_reply(_handshake(_handshake_config()), Allowed(ph.HANDSHAKE.name))
    with pytest.raises(EgressViolation, match=r"config 'encoder-hash' holds 'aaaa.*length 100000") as refused:
        check_reply(_handshake(_handshake_config(**{ph.ENCODER_HASH: "a" * 100_000})), Allowed(ph.HANDSHAKE.name))
    assert "at most 128 characters" in str(refused.value) and "over the phase's cap" in str(refused.value)
    refusals = {
        ph.SITE_NAME: "../../etc",  # not a plain name
        ph.ENCODER_NAME: "uni\nTCGA-AB-1234",  # a line break: not in the character set
        ph.CLASSES: [f"c{i}" for i in range(ph.MAX_CLASSES + 1)],  # too many classes
    }
    for key, value in refusals.items():
        with pytest.raises(EgressViolation, match=f"config '{key}'"):
            check_reply(_handshake(_handshake_config(**{key: value})), Allowed(ph.HANDSHAKE.name))
    with pytest.raises(EgressViolation, match="'classes' must be a list"):
        check_reply(_handshake(_handshake_config(**{ph.CLASSES: "neg,pos"})), Allowed(ph.HANDSHAKE.name))
    with pytest.raises(EgressViolation, match="'site-name' must be a string"):
        check_reply(_handshake(_handshake_config(**{ph.SITE_NAME: ["a", "b"]})), Allowed(ph.HANDSHAKE.name))


def test_the_handshake_at_its_declared_bounds_fits_its_byte_cap_and_one_more_metric_flood_does_not() -> None:
    classes = [f"{i:02d}" + "x" * 62 for i in range(ph.MAX_CLASSES)]
    counts = {ph.split_count(s, k): 10 for s in ph.SPLITS for k in range(ph.MAX_CLASSES)}
    widest = _handshake(
        _handshake_config(**{ph.SITE_NAME: "s" * 64, ph.ENCODER_NAME: "e" * 128, ph.CLASSES: classes}),
        {**counts, **{ph.split_count(s): 10 for s in ph.SPLITS}, ph.ENCODER_DIM: 1536, ph.TOKEN_GRID: 4},
    )
    check_reply(widest, Allowed(ph.HANDSHAKE.name))
    # declared names, finite scalars, but thousands of them: the byte cap stops what the names let through
    flood = _handshake(_handshake_config(), {ph.split_count("train", k): 0.5 for k in range(5_000)})
    with pytest.raises(EgressViolation, match=r"over the phase's cap of \d+"):
        check_reply(flood, Allowed(ph.HANDSHAKE.name))


def test_the_byte_cap_follows_the_declared_arrays_and_members() -> None:
    sums, counts = ArraySpec((4, 8), "float64"), ArraySpec((4,), "int64")
    allowed = egress.arrays_reply(ph.CLUSTER_STATS.name, {ph.SUMS: sums, ph.COUNTS: counts})
    assert allowed.max_bytes == math.ceil((4 * 8 * 8 + 4 * 8) * ph.ARRAY_SLACK) + ph.REPLY_ALLOWANCE
    packed = ArrayRecord(
        {f"expert-{c}.params": Array(np.zeros(10, np.float32)) for c in range(3)}
    )  # three packed models
    weights = egress.weights_reply(ph.EXPERTS.name, packed)
    assert weights.members == 3
    assert weights.max_bytes == math.ceil(120 * ph.ARRAY_SLACK) + ph.REPLY_ALLOWANCE + 3 * ph.MEMBER_ALLOWANCE


def test_logits_are_checked_for_shape_and_finiteness() -> None:
    allowed = egress.arrays_reply(ph.LOGITS.name, {ph.TEACHER_LOGITS: ArraySpec((5, 2), "float32")})

    def reply(logits: np.ndarray) -> RecordDict:
        return RecordDict({p.LOGITS_RECORD: ArrayRecord({ph.TEACHER_LOGITS: Array(logits)})})

    check_reply(reply(np.zeros((5, 2), np.float32)), allowed)
    with pytest.raises(EgressViolation, match="allowed only"):
        check_reply(reply(np.zeros((6, 2), np.float32)), allowed)
    bad = np.zeros((5, 2), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(EgressViolation, match="'teacher' holds non-finite values"):
        check_reply(reply(bad), allowed)


# ---- error replies --------------------------------------------------------------------------------------------


def test_site_failures_map_to_codes() -> None:
    assert error_code(EgressViolation("x"))[0] is ErrorCode.EGRESS_REFUSED
    assert error_code(SiteConfigError("x"))[0] is ErrorCode.SITE_CONFIG
    assert error_code(RunIdError("x"))[0] is ErrorCode.SITE_CONFIG
    assert error_code(LabelsError("labels of TCGA-1"))[0] is ErrorCode.SITE_DATA
    assert error_code(KeyError("teacher"))[0] is ErrorCode.RUN_REQUEST
    assert error_code(MemoryError())[0] is ErrorCode.RESOURCES
    assert error_code(RuntimeError("TCGA-1 broke")) == (ErrorCode.INTERNAL, None)
    assert all(code >= 100 and code in egress.ERROR_MESSAGES for code in ErrorCode)  # above Flower's own codes


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return make_site(tmp_path, "site1", {"train": 4, "val": 2, "test": 2}, seed=3)


def _ask_handshake(site: Path, run_id: str = "errors", **node: object) -> Message:
    cfg = FederationConfig(run_id="errors")  # the run id the site uses is the message's
    grid = LocalGrid(client_app, [{"site-dir": str(site), **node}], cfg.to_run_config())
    content = RecordDict({p.CONFIG: ConfigRecord({ph.RUN_ID: run_id, ph.PHASE: ph.HANDSHAKE.phase})})
    message = Message(content=content, dst_node_id=FIRST_NODE, message_type=ph.HANDSHAKE.message_type)
    (reply,) = grid.send_and_receive([message])
    return reply


def test_an_error_reply_carries_a_code_and_fixed_text_and_is_ledgered(
    site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A labels error naming a slide id: the id stays in the site's log, the reply says `site-data` only."""
    secret = "TCGA-SECRET-0001"
    labels = site / "labels.csv"
    labels.write_text(labels.read_text() + f"{secret},neg,train,p_x\n{secret},pos,train,p_x\n")
    with caplog.at_level(logging.ERROR):
        reply = _ask_handshake(site)
    assert reply.has_error()
    assert reply.error.code == ErrorCode.SITE_DATA
    assert reply.error.reason == egress.error_reason(ErrorCode.SITE_DATA)
    assert secret not in reply.error.reason and secret in caplog.text  # the full text at the site only
    ledger = EgressLedger(site / "runs" / "errors" / "egress.jsonl")
    (line,) = ledger.entries()
    assert line["phase"] == "handshake" and line["error"]["code"] == ErrorCode.SITE_DATA
    assert line["error"]["name"] == "site-data" and line["arrays"] == [] and secret not in json.dumps(line)
    assert line["sha256"] == egress.message_sha256(reply.error) and line["prev"] == GENESIS
    assert ledger.verify() is None


def test_a_run_id_that_leaves_runs_is_answered_with_a_code_and_ledgered_nowhere(site: Path) -> None:
    reply = _ask_handshake(site, run_id="../escape")
    assert reply.has_error() and reply.error.code == ErrorCode.SITE_CONFIG and "escape" not in reply.error.reason
    assert not (site / "escape").exists() and not (site / "runs").exists()


# ---- the ledger -----------------------------------------------------------------------------------------------


def _ledger(path: Path, lines: int = 4, syslog: str | None = None) -> EgressLedger:
    ledger = EgressLedger(path, syslog)
    for r in range(lines):
        content = RecordDict(
            {
                p.ARRAYS: ArrayRecord({"params": Array(np.full(6, r, np.float32))}),
                p.METRICS: MetricRecord({ph.NUM_EXAMPLES: 3, ph.VAL_LOSS: 0.5}),
            }
        )
        ledger.append("student", r + 1, content)
    ledger.append_error("student", lines + 1, egress.error_of(ErrorCode.RESOURCES))
    return ledger


def test_each_ledger_line_holds_the_message_hash_and_chains_to_the_line_before(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "egress.jsonl")
    entries, raw = ledger.entries(), (tmp_path / "egress.jsonl").read_text().splitlines()
    assert entries[0]["prev"] == GENESIS
    assert [e["prev"] for e in entries[1:]] == [sha256_text(line) for line in raw[:-1]]
    content = RecordDict({p.ARRAYS: ArrayRecord({"params": Array(np.full(6, 0, np.float32))})})
    assert entries[0]["sha256"] != egress.message_sha256(content)  # the metrics are part of the message
    assert {"time", "phase", "round", "bytes", "arrays", "metrics", "configs"} <= set(entries[0])  # as before
    (array,) = entries[0]["arrays"]
    assert (array["record"], array["name"], array["shape"], array["dtype"]) == ("arrays", "params", [6], "float32")
    assert ledger.verify() is None


def _tamper(path: Path, how: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    if how == "edit":
        lines[1] = lines[1].replace('"round": 2', '"round": 7')
    elif how == "edit-last":
        lines[-1] = lines[-1].replace('"round": 5', '"round": 6')
    elif how == "delete":
        del lines[2]
    elif how == "insert":
        lines.insert(2, lines[1])
    elif how == "byte":
        lines[1] = lines[1][:40] + chr(ord(lines[1][40]) ^ 1) + lines[1][41:]
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    ("how", "line", "why"),
    [
        ("edit", 2, "the line was edited"),
        ("edit-last", 5, "the line was edited"),
        ("delete", 3, "'prev' does not match line 2"),
        ("insert", 3, "'prev' does not match line 2"),
        ("byte", 2, ""),
    ],
)
def test_a_tampered_ledger_is_detected_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, line: int, why: str
) -> None:
    site = tmp_path / "site"
    path = site / "runs" / "r1" / "egress.jsonl"
    _ledger(path)
    _tamper(path, how)
    broken = verify_chain(path)
    assert broken is not None and broken.line == line and why in broken.reason
    assert cli.main(["audit", str(site)]) == 1
    assert f"{path}:{line}:" in capsys.readouterr().out


def test_audit_prints_what_left_per_run_and_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site"
    _ledger(site / "runs" / "r1" / "egress.jsonl")
    _ledger(site / "runs" / "r2" / "egress.jsonl", lines=1)
    assert cli.main(["audit", str(site)]) == 0
    out = capsys.readouterr().out
    assert "run r1:" in out and "chain verified (5 lines)" in out and "run r2:" in out
    assert "student: 5 replies, rounds 1-5" in out and "1 error reply" in out
    assert (
        "array arrays.params float32 (6,) x4" in out and f"error round 5: {int(ErrorCode.RESOURCES)} resources" in out
    )
    assert cli.main(["audit", str(tmp_path / "nowhere")]) == 2


def test_the_ledger_is_mirrored_to_syslog(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        ledger = _ledger(tmp_path / "egress.jsonl", lines=1, syslog=f"127.0.0.1:{server.getsockname()[1]}")
        received = [server.recv(65536).decode() for _ in range(2)]
    written = (tmp_path / "egress.jsonl").read_text().splitlines()
    assert [line in got for line, got in zip(written, received, strict=True)] == [True, True]
    assert ledger.verify() is None
