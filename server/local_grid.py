"""fedslide's in-process runtime: a Grid that runs the sites' ClientApps in the ServerApp's own process.

It runs the whole protocol without SuperLink or SuperNodes: `fedslide evaluate` (the leave-one-site-out study,
`deploy/study/loso.py`) runs its federations on it, and the tests use it. Each message is deep-copied as the wire
would and handed to the node's ClientApp with that node's Context (its node config and persistent state); a
ClientApp exception becomes an error reply, as a SuperNode would send. Replies are computed when a message is pushed.

A pushed message gets the id and run a SuperLink would give it, and a reply the node that sent it, as new
messages (`common.flower_compat.restamped`: Flower's `Message(..., metadata=Metadata(...))`, no writes to its
private fields); the task identity a ServerApp process has is set through Flower's own setters
(`common.flower_compat.set_server_task_identity`). Both check the installed Flower's version first.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedslide.common import flower_compat
from fedslide.common.flower_compat import Run

FIRST_NODE = 101  # node ids of the sites (Flower's SuperLink is node 1)

Hook = Callable[[int, Message], Message | None]  # (node_id, reply) -> reply to deliver (None: drop it)


class LocalGrid(Grid):
    """Nodes first_node.. (default FIRST_NODE), each a ClientApp with its own node config; replies are computed synchronously."""

    synchronous = True  # a reply not there right after the push never comes (a dropped one)

    def __init__(
        self,
        app: ClientApp,
        node_configs: list[dict[str, Any]],
        run_config: dict[str, Any],
        run_id: int = 1,
        first_node: int = FIRST_NODE,
    ):
        self.app = app
        self.run_config = dict(run_config)
        self._run = Run.create_empty(run_id)
        # Flower stamps messages with the process's run and node (a ServerApp process has both)
        flower_compat.set_server_task_identity(run_id)
        self.contexts = {
            first_node + i: Context(
                run_id=run_id,
                node_id=first_node + i,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=self.run_config,
            )
            for i, cfg in enumerate(node_configs)
        }
        self.offline: set[int] = set()
        self.reply_hook: Hook | None = None
        self.received: list[Message] = []  # every reply delivered to the server (tests inspect them)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            node = int(message.metadata.dst_node_id)
            if node in self.contexts and node not in self.offline:  # the wire's copy, as the SuperLink stamps it
                reply = self._deliver(
                    node,
                    flower_compat.restamped(copy.deepcopy(message), message_id=message_id, run_id=self._run.run_id),
                )
                if reply is not None:
                    self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def _deliver(self, node: int, message: Message) -> Message | None:
        try:
            reply = self.app(message, self.contexts[node])
        except Exception as exc:  # a ClientApp failure is an error reply, as from a SuperNode
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
        reply = flower_compat.restamped(copy.deepcopy(reply), src_node_id=node)
        return self.reply_hook(node, reply) if self.reply_hook is not None else reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
        self.received.extend(out)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))  # replies are synchronous
