"""Shorter waits in Flower's polling loops, for the processes fedslide runs itself (flwr 1.42).

Flower's transport polls; it does not push. Each federation round trip pays its fixed waits:

- an idle SuperNode asks the SuperLink for a message every 3 s (`start_client_internal`: `time.sleep(3)`), and
  looks for the ClientApp's reply every 0.5 s;
- a message's objects (the arrays) that are not there yet are pulled again after 1 s, then 2, 4, 8, 10 s
  (`pull_objects`: `PULL_INITIAL_BACKOFF`, `PULL_BACKOFF_CAP`). A SuperNode creates the ClientApp's task
  before it has pulled the objects from the SuperLink, so the ClientApp nearly always waits one back-off or more.

Flower has no setting for either. These functions shorten them in the calling process only: the messages,
their contents, TLS and node authentication stay Flower's. `flower_internals_present` tells whether the
Flower installed still has what they change; when it does not they change nothing and say so.
"""

from __future__ import annotations

import logging
import math
import time
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2  # the SuperNode's sleeps between polls (Flower: 3 s idle, 0.5 s for a reply)
PULL_BACKOFF_S = 0.05  # first wait before pulling a missing object again (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.5  # longest wait between pulls of one object (Flower: 10 s)
_PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")


class CappedSleep:
    """Stands in for the `time` module inside one Flower module: every `sleep` lasts at most `cap` seconds."""

    def __init__(self, cap: float):
        if not cap > 0:
            raise ValueError(f"cap must be > 0 seconds, got {cap!r}")
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _pull_module() -> ModuleType:
    from flwr.supercore.inflatable import inflatable_utils

    return inflatable_utils


def _supernode_loop_module() -> ModuleType:
    from flwr.supernode import start_client_internal

    return start_client_internal


def _has_backoff_defaults(function: Any) -> bool:
    """A pull function whose back-off is set by keyword defaults (what `shorten_object_pulls` changes)."""
    return {"initial_backoff", "backoff_cap"} <= (getattr(function, "__kwdefaults__", None) or {}).keys()


def _has_module_time(loop: ModuleType) -> bool:
    """The SuperNode loop sleeps through a module-level `time` (what `shorten_supernode_polls` replaces)."""
    current = getattr(loop, "time", None)
    return current is time or isinstance(current, CappedSleep)


def flower_internals_present() -> list[str]:
    """What this module changes that the installed Flower lacks (empty: everything is there)."""
    pulls = _pull_module()
    missing = [f"flwr.supercore.inflatable.inflatable_utils.{name}(initial_backoff=, backoff_cap=)"
               for name in _PULL_FUNCTIONS if not _has_backoff_defaults(getattr(pulls, name, None))]
    if not _has_module_time(_supernode_loop_module()):
        missing.append("flwr.supernode.start_client_internal.time")
    return missing


def shorten_object_pulls(initial: float = PULL_BACKOFF_S, cap: float = PULL_BACKOFF_CAP_S) -> bool:
    """Pull a missing object again after `initial` s, doubling up to `cap` s, in this process; whether it applied."""
    if not 0 < initial <= cap:
        raise ValueError(f"need 0 < initial <= cap, got initial={initial!r}, cap={cap!r}")
    pulls = _pull_module()
    functions = [getattr(pulls, name, None) for name in _PULL_FUNCTIONS]
    if not all(_has_backoff_defaults(f) for f in functions):
        log.warning("Flower's object pulls have no initial_backoff/backoff_cap here; left at Flower's back-off")
        return False
    for function in functions:
        defaults = function.__kwdefaults__
        # as many tries as fit in Flower's time limit: shorter waits must not make a slow pull give up sooner
        max_time, tries = defaults.get("max_time"), defaults.get("max_tries_per_object")
        if isinstance(max_time, (int, float)) and isinstance(tries, int):
            defaults["max_tries_per_object"] = max(tries, math.ceil(max_time / cap))
        defaults.update(initial_backoff=initial, backoff_cap=cap)
    return True


def shorten_supernode_polls(cap: float = IDLE_POLL_S) -> bool:
    """Make this process's SuperNode loop sleep at most `cap` s between polls; whether it applied."""
    loop = _supernode_loop_module()
    if not _has_module_time(loop):
        log.warning("Flower's SuperNode loop has no module-level `time` here; its polls stay at Flower's intervals")
        return False
    loop.time = CappedSleep(cap)  # type: ignore[attr-defined]
    return True
