"""Every use fedslide makes of Flower beyond its public API (`flwr.app`, `flwr.clientapp`, `flwr.serverapp`), in one
place, written for flwr 1.42.x (`FLOWER_MINOR`).

What is here:

- Flower's internal names fedslide imports (`INTERNAL_NAMES`): import them from this module
  (`from fedslide.common.flower_compat import RuntimeHttpClient`); each is imported from Flower on first use.
- Shorter waits in Flower's polling loops, for the processes fedslide runs itself. Flower's transport polls: an idle
  SuperNode asks the SuperLink for a message every 3 s and looks for the ClientApp's reply every 0.5 s
  (`start_client_internal`: `time.sleep`); a message's arrays that are not there yet are pulled again after 1 s, then
  2, 4, 8, 10 s (`pull_objects`: `initial_backoff`, `backoff_cap`). Flower has no setting for either;
  `shorten_supernode_polls` and `shorten_object_pulls` shorten them in the calling process only (the messages, their
  contents, TLS and node authentication stay Flower's).
- The SuperNode's SuperExec launch (`start_superexec_through`), the warm SuperExec's ClientApp process that answers
  with the site's installed app and never installs the task's FAB (`run_clientapp_without_fab`), its FAB re-install
  when FAB code is allowed (`reuse_installed_fab`), the in-process runtime's task identity
  (`set_server_task_identity`), a strategy's reply check (`checked_replies`) and FedAvgM's server momentum
  (`fedavgm_momentum`, `set_fedavgm_momentum`).

Every function that changes Flower or writes its private fields first checks the installed Flower's minor version
(`check_flower_version`) and raises `FlowerVersionError` on another one. Importing this module imports no Flower code.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import subprocess
import time
from collections.abc import Callable, Iterable
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.serverapp.strategy import FedAvg, FedAvgM

log = logging.getLogger(__name__)

FLOWER_MINOR = "1.42"  # the Flower minor version this module was written for and the suite runs (pyproject.toml)

# Flower's internal names fedslide uses -> the module that defines them in flwr 1.42
INTERNAL_NAMES: dict[str, str] = {
    "APP_DIR": "flwr.common.constant",
    "FAB_HASH_TRUNCATION": "flwr.common.constant",
    "SUPERLINK_NODE_ID": "flwr.common.constant",
    "parse_config_args": "flwr.common.config",
    "error_to_proto": "flwr.common.serde",
    "recorddict_to_proto": "flwr.common.serde",
    "AcquireTaskRequest": "flwr.proto.runtime_pb2",
    "aggregate_arrayrecords": "flwr.serverapp.strategy.strategy_utils",
    "add_superexec_auth_secret_args": "flwr.supercore.auth",
    "load_superexec_auth_secret": "flwr.supercore.auth",
    "TaskType": "flwr.supercore.constant",
    "register_signal_handlers": "flwr.supercore.exit",
    "RuntimeVersionHttpInterceptor": "flwr.supercore.interceptors",
    "SuperExecAuthHttpInterceptor": "flwr.supercore.interceptors",
    "update_console_handler": "flwr.supercore.logger",
    "make_simple_http_retry_invoker": "flwr.supercore.retry",
    "Run": "flwr.supercore.run",
    "RuntimeHttpClient": "flwr.supercore.runtime",
    "ExecutionSpec": "flwr.supercore.superexec.executor",
    "LaunchResult": "flwr.supercore.superexec.executor",
    "AutoExecPlugin": "flwr.supercore.superexec.plugin",
    "EventType": "flwr.supercore.telemetry",
    "validate_and_resolve_root_certificates": "flwr.supercore.tls",
    "disable_process_dumping": "flwr.supercore.utils",
    "get_flwr_home": "flwr.supercore.utils",
    "flower_supernode": "flwr.supernode.cli.flower_supernode",
    "run_clientapp": "flwr.supernode.runtime.run_clientapp",
}

IDLE_POLL_S = 0.2  # the SuperNode's sleeps between polls (Flower: 3 s idle, 0.5 s for a reply)
PULL_BACKOFF_S = 0.05  # first wait before pulling a missing object again (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.5  # longest wait between pulls of one object (Flower: 10 s)
_PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")
_PULL_MODULE = "flwr.supercore.inflatable.inflatable_utils"
_SUPERNODE_LOOP_MODULE = "flwr.supernode.start_client_internal"
_CLIENTAPP_RUNTIME_MODULE = "flwr.supernode.runtime.run_clientapp"


class FlowerVersionError(RuntimeError):
    """The installed Flower is not the minor version fedslide's use of its internals was written for."""


def check_flower_version(installed: str | None = None) -> None:
    """Raise FlowerVersionError unless `installed` (default: the installed flwr's version) is FLOWER_MINOR.x."""
    if installed is None:
        installed = _installed_flower()
    if installed.split(".")[:2] != FLOWER_MINOR.split("."):
        raise FlowerVersionError(
            f"fedslide's use of Flower internals (fedslide/common/flower_compat.py) was written for flwr "
            f"{FLOWER_MINOR}.x, but flwr {installed} is installed: install flwr>={FLOWER_MINOR},<"
            f"{_next_minor(FLOWER_MINOR)} (pyproject.toml), or check every function of that module against flwr "
            f"{installed} and then set FLOWER_MINOR there"
        )


@cache
def _installed_flower() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError as exc:
        raise FlowerVersionError(f"flwr is not installed (fedslide needs flwr {FLOWER_MINOR}.x)") from exc


def _next_minor(minor: str) -> str:
    major, _, number = minor.partition(".")
    return f"{major}.{int(number) + 1}"


def __getattr__(name: str) -> Any:
    """One of Flower's internal names (INTERNAL_NAMES), imported from Flower on first use."""
    module = INTERNAL_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    check_flower_version()
    return getattr(importlib.import_module(module), name)


# ---- polling: the SuperNode loop's sleeps and the object pulls' back-off -------------------------------------------
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


def _has_backoff_defaults(function: Any) -> bool:
    """A pull function whose back-off is set by keyword defaults (what `shorten_object_pulls` changes)."""
    return {"initial_backoff", "backoff_cap"} <= (getattr(function, "__kwdefaults__", None) or {}).keys()


def _has_module_time(loop: ModuleType) -> bool:
    """The SuperNode loop sleeps through a module-level `time` (what `shorten_supernode_polls` replaces)."""
    current = getattr(loop, "time", None)
    return current is time or isinstance(current, CappedSleep)


def _has_module_subprocess(loop: ModuleType) -> bool:
    """The SuperNode starts its SuperExec through a module-level `subprocess` (what `start_superexec_through` replaces)."""
    current = getattr(loop, "subprocess", None)
    return current is subprocess or isinstance(current, PopenInstead)


def flower_internals_present() -> list[str]:
    """What the patches here change that the installed Flower lacks (empty: everything is there)."""
    pulls = importlib.import_module(_PULL_MODULE)
    missing = [
        f"{_PULL_MODULE}.{name}(initial_backoff=, backoff_cap=)"
        for name in _PULL_FUNCTIONS
        if not _has_backoff_defaults(getattr(pulls, name, None))
    ]
    loop = importlib.import_module(_SUPERNODE_LOOP_MODULE)
    missing += [
        f"{_SUPERNODE_LOOP_MODULE}.{name}"
        for name, present in (("time", _has_module_time(loop)), ("subprocess", _has_module_subprocess(loop)))
        if not present
    ]
    runtime = importlib.import_module(_CLIENTAPP_RUNTIME_MODULE)
    missing += [
        f"{_CLIENTAPP_RUNTIME_MODULE}.{name}"
        for name in ("install_from_fab", "get_load_client_app_fn")
        if not callable(getattr(runtime, name, None))
    ]
    return missing


def shorten_object_pulls(initial: float = PULL_BACKOFF_S, cap: float = PULL_BACKOFF_CAP_S) -> bool:
    """Pull a missing object again after `initial` s, doubling up to `cap` s, in this process; whether it applied."""
    if not 0 < initial <= cap:
        raise ValueError(f"need 0 < initial <= cap, got initial={initial!r}, cap={cap!r}")
    check_flower_version()
    pulls = importlib.import_module(_PULL_MODULE)
    functions: list[Any] = [getattr(pulls, name, None) for name in _PULL_FUNCTIONS]
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
    sleep = CappedSleep(cap)
    check_flower_version()
    loop = importlib.import_module(_SUPERNODE_LOOP_MODULE)
    if not _has_module_time(loop):
        log.warning("Flower's SuperNode loop has no module-level `time` here; its polls stay at Flower's intervals")
        return False
    loop.time = sleep  # type: ignore[attr-defined]
    return True


# ---- the SuperNode's SuperExec and the warm SuperExec's tasks ------------------------------------------------------
class PopenInstead:
    """Stands in for `subprocess` inside one Flower module: `Popen` is the given callable, the rest is the module's."""

    def __init__(self, popen: Callable[..., subprocess.Popen]) -> None:
        self.Popen = popen  # as Flower calls it

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def start_superexec_through(popen: Callable[..., subprocess.Popen]) -> bool:
    """Make this process's SuperNode start its SuperExec (subprocess isolation) with `popen(command, ...)` in place of
    `subprocess.Popen`; whether it applied."""
    check_flower_version()
    loop = importlib.import_module(_SUPERNODE_LOOP_MODULE)
    if not _has_module_subprocess(loop):
        log.warning(
            "Flower's SuperNode does not start its SuperExec through a module-level `subprocess` here; "
            "it runs Flower's own (a fresh flwr-clientapp per message)"
        )
        return False
    loop.subprocess = PopenInstead(popen)  # type: ignore[attr-defined]
    return True


def superexec_popen() -> Callable[..., Any]:
    """What this process's SuperNode starts its SuperExec with (`subprocess.Popen` unless changed here)."""
    return importlib.import_module(_SUPERNODE_LOOP_MODULE).subprocess.Popen


def reuse_installed_fab(fab_hash: str, fab_dir: Path) -> None:
    """In a ClientApp process whose FAB is installed at `fab_dir`: Flower's `install_from_fab` returns that directory
    for this FAB's bytes (what it does after unzipping and checking them when the directory exists)."""
    check_flower_version()
    runtime = importlib.import_module(_CLIENTAPP_RUNTIME_MODULE)
    install = runtime.install_from_fab

    def installed_or_install(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Path:
        if isinstance(fab_file, bytes) and hashlib.sha256(fab_file).hexdigest() == fab_hash:
            return fab_dir
        return install(fab_file, *args, **kwargs)

    runtime.install_from_fab = installed_or_install  # type: ignore[attr-defined]


def run_clientapp_without_fab(answer_with: Callable[[bytes], Callable[..., Any]], **run_clientapp_args: Any) -> None:
    """In a ClientApp process: Flower's `run_clientapp` (the task's message, context and reply go through Flower as
    usual) except that the task's FAB is neither installed nor imported: `answer_with(fab_bytes)` gives the callable
    that answers the message (`app(message=..., context=...)`, as Flower calls a ClientApp)."""
    check_flower_version()
    runtime = importlib.import_module(_CLIENTAPP_RUNTIME_MODULE)
    fab: list[bytes] = []

    def keep_fab(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> None:
        if not isinstance(fab_file, bytes):
            raise TypeError(f"expected the FAB's bytes, got {type(fab_file).__name__}")
        fab.append(fab_file)

    def load_fn(*args: Any, **kwargs: Any) -> Callable[[str, str, str], Callable[..., Any]]:
        return lambda fab_id, fab_version, fab_hash: answer_with(fab[-1])

    runtime.install_from_fab = keep_fab  # type: ignore[attr-defined]
    runtime.get_load_client_app_fn = load_fn  # type: ignore[attr-defined]
    runtime.run_clientapp(**run_clientapp_args)


# ---- the in-process runtime (server.local_grid.LocalGrid) ----------------------------------------------------------
def set_server_task_identity(run_id: int) -> None:
    """Make messages created in this process come from the SuperLink's node in run `run_id` (Flower sets this when it
    starts a ServerApp process; `Message(...)` reads it)."""
    check_flower_version()
    task_identity = importlib.import_module("flwr.supercore.task_identity").TaskIdentity
    superlink = importlib.import_module("flwr.common.constant").SUPERLINK_NODE_ID
    task_identity.run_id, task_identity.node_id, task_identity.task_id = run_id, superlink, 1


def restamped(message: Message, **changes: Any) -> Message:
    """`message` (content or error) with some of its metadata changed, as a new message: Flower's metadata ids have
    no setters, and `Message(..., metadata=...)` is the constructor Flower's own runtimes use."""
    check_flower_version()
    from flwr.app import Message, Metadata

    m = message.metadata
    fields: dict[str, Any] = {
        "run_id": m.run_id,
        "message_id": m.message_id,
        "src_node_id": m.src_node_id,
        "dst_node_id": m.dst_node_id,
        "reply_to_message_id": m.reply_to_message_id,
        "group_id": m.group_id,
        "created_at": m.created_at,
        "ttl": m.ttl,
        "message_type": m.message_type,
        "src_task_id": m.src_task_id,
        "dst_task_id": m.dst_task_id,
    }
    metadata = Metadata(**(fields | changes))
    if message.has_error():
        return Message(error=message.error, metadata=metadata)  # type: ignore[call-overload]  # not in the overloads
    return Message(content=message.content, metadata=metadata)  # type: ignore[call-overload]


# ---- strategies -----------------------------------------------------------------------------------------------------
def checked_replies(
    strategy: FedAvg, replies: Iterable[Message], *, is_train: bool
) -> tuple[list[Message], list[Message]]:
    """A FedAvg-family strategy's own split of `replies` into (valid, errors), logged and content-checked as it does
    before aggregating."""
    check_flower_version()
    return strategy._check_and_log_replies(list(replies), is_train=is_train)  # noqa: SLF001


def fedavgm_momentum(strategy: FedAvgM) -> list[Any] | None:
    """FedAvgM's server momentum (one NumPy array per model array; None before its first aggregation)."""
    check_flower_version()
    return strategy.momentum_vector


def set_fedavgm_momentum(strategy: FedAvgM, momentum: list[Any]) -> None:
    """Restore FedAvgM's server momentum (as returned by `fedavgm_momentum`), e.g. when a run resumes."""
    check_flower_version()
    strategy.momentum_vector = momentum
