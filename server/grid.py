"""A Grid wrapper that admits only the sites that passed the handshake, meters bytes and records absentees."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedslide.common.egress import message_bytes
from fedslide.common.flower_compat import Run

log = logging.getLogger(__name__)


class FederationGrid(Grid):
    """Delegates to Flower's Grid; `get_node_ids` lists only admitted nodes; traffic is counted per phase."""

    def __init__(self, inner: Grid):
        self.inner = inner
        self.admitted: set[int] | None = None  # None: every connected node
        self.phase = "handshake"
        self.server_round = 0
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0, "messages": 0})
        self.uploads: list[dict[str, Any]] = []  # per reply: phase, round, node, bytes
        self.missing: list[dict[str, Any]] = []  # per round with absentees: phase, round, nodes, reasons
        self.pull_interval = 0.2

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.inner.get_node_ids())
        return nodes if self.admitted is None else [n for n in nodes if n in self.admitted]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def _exchange(self, sent: list[Message], timeout: float | None) -> list[Message]:
        """Push, then pull every `pull_interval` s (Flower's own loop waits 3 s between pulls)."""
        if getattr(self.inner, "synchronous", False):  # every reply that will ever come exists already
            return list(self.inner.send_and_receive(sent, timeout=timeout))
        pending = set(self.inner.push_messages(sent))
        deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (timeout is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.pull_interval)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send, wait, count bytes both ways, and note which destinations did not answer usefully."""
        sent = list(messages)
        counter = self.bytes[self.phase]
        for message in sent:
            counter["down"] += message_bytes(message.content)
        replies = self._exchange(sent, timeout)
        answered: set[int] = set()
        reasons: dict[int, str] = {}
        destination = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
        for reply in replies:
            # an error about a node (e.g. a missed heartbeat) comes from the SuperLink: file it under the node asked
            node = destination.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
            if reply.has_error():
                reasons[node] = str(reply.error.reason)[:300]
                continue
            size = message_bytes(reply.content)
            counter["up"] += size
            counter["messages"] += 1
            answered.add(node)
            self.uploads.append({"phase": self.phase, "round": self.server_round, "node": node, "bytes": size})
        absent = sorted({int(m.metadata.dst_node_id) for m in sent} - answered)
        if absent:
            log.warning(
                "phase %s round %d: no usable reply from node(s) %s %s",
                self.phase,
                self.server_round,
                absent,
                {n: reasons[n] for n in absent if n in reasons},
            )
            self.missing.append(
                {
                    "phase": self.phase,
                    "round": self.server_round,
                    "nodes": absent,
                    "reasons": {str(n): reasons.get(n, "timeout") for n in absent},
                }
            )
        return replies
