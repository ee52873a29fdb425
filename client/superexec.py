"""The site's warm SuperExec: each ClientApp message runs in a process forked from one that has already
imported torch, Flower's runtime and the app's libraries.

Flower's own SuperExec starts a fresh `flwr-clientapp` for every message, which spends ≈ 3 s of CPU importing
torch and Flower before it reads the message. This one is Flower's SuperExec loop (`AcquireTask` from the
SuperNode's Runtime API, launch through Flower's `AutoExecPlugin`) with an executor that forks instead; the child
runs Flower's own `run_clientapp` with the task's token, so the message, the context and the reply go through
Flower as before.

Only the site's code runs at the site (the default): the child answers with the ClientApp of the fedslide package
installed here (imported by this process before any task), and the app bundle (FAB) the coordinator sent is neither
installed, put on `sys.path` nor imported (`flower_compat.run_clientapp_without_fab`). Before that ClientApp sees
the message, the FAB's manifest and code are checked against the site's (`flower_app.vet_fab`: fedslide's
ClientApp at the installed version, client code byte-identical to the installed one, and the FAB's SHA-256 on the
node config's `allowed-fab-hashes` when the site sets one); a FAB that fails is refused: the refusal is logged here
and in the run's egress ledger, and the coordinator gets an error reply with code 106 `code-refused`
(`egress.ErrorCode.CODE_REFUSED`) and the refusal's fixed text; nothing else leaves.

`--allow-fab-code` (development; logged as a warning) runs the FAB's code instead, as Flower's own SuperExec does:
the app's own packages are dropped from the child's module table, so each task imports the code of the FAB it
was sent. Once a task of a FAB has run to completion, this process imports the app from the directory Flower
installed that FAB into (`warm_up`); later tasks of the same FAB keep those modules and Flower's re-install of a
FAB that is already installed is skipped. A task of any other FAB runs cold, so a new app version is never run
with the old code.

With `--site-dir`, once the app is imported it also holds the site's labelled feature files in memory
(`client.site_run.hold_site_features`, re-checked after every task), so a task reads a file from disk only when it
changed since (or did not fit in `--feature-memory-gb`); without it, every task reads the site's files itself.

Start the SuperNode with `--isolation process` and this next to it (it preloads, then waits for the
SuperNode's Runtime API):

    fedslide superexec --runtime-api-address 127.0.0.1:9094 --insecure [--parent-pid SUPERNODE_PID] [--site-dir DIR]
        [--allow-fab-code]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message

from fedslide.common import flower_compat
from fedslide.common.egress import ErrorCode, error_of
from fedslide.common.federation.protocol import CONFIG
from fedslide.common.flower_app import (
    APP_PACKAGES,  # with --allow-fab-code a task imports these from its FAB
    COMPONENTS,
    REFUSALS,
    vet_fab,
)
from fedslide.common.flower_compat import (
    APP_DIR,
    FAB_HASH_TRUNCATION,
    AcquireTaskRequest,
    AutoExecPlugin,
    EventType,
    ExecutionSpec,
    LaunchResult,
    RuntimeHttpClient,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
    TaskType,
    add_superexec_auth_secret_args,
    disable_process_dumping,
    get_flwr_home,
    load_superexec_auth_secret,
    make_simple_http_retry_invoker,
    register_signal_handlers,
    reuse_installed_fab,
    run_clientapp_without_fab,
    shorten_object_pulls,
    validate_and_resolve_root_certificates,
)
from fedslide.common.processes import port_open

log = logging.getLogger(__name__)

# imported once here, before any fork: what a ClientApp message needs (the app module's imports; torch._dynamo,
# which torch imports when the first optimizer is made, ≈ 1.8 s; the libraries the app loads lazily so that a cold
# `flwr-clientapp` need not pay for them)
PRELOAD = (
    "flwr.supernode.runtime.run_clientapp",
    "fedslide.client.client_app",
    "torch._dynamo",
    "sklearn.metrics",
    "sklearn.cluster",
    "sklearn.utils.class_weight",
    "scipy.optimize",
    "scipy.sparse",
)
APP_MODULES = tuple(m for m in PRELOAD if m.partition(".")[0] in APP_PACKAGES)  # what `warm_up` imports from a FAB
POLL_S = 0.2  # between AcquireTask calls (Flower's SuperExec: 1 s by default)
FEATURE_MEMORY_GB = 8.0  # the most feature arrays a SuperExec holds for its tasks
_AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})  # as Flower's SuperExec signs them


def forget_app_modules() -> list[str]:
    """Drop the app's own modules from this process's module table (the next import reads them anew, from the
    FAB directory Flower puts first on sys.path); their names."""
    names = [m for m in sys.modules if m.partition(".")[0] in APP_PACKAGES]
    for name in names:
        del sys.modules[name]
    return names


def installed_fab_dir(fab_hash: str) -> Path | None:
    """The directory Flower installed the FAB with this SHA-256 into (`<FLWR_HOME>/apps/<id>.<version>.<hash[:8]>`),
    if there is exactly one."""
    found = list((get_flwr_home() / APP_DIR).glob(f"*.{fab_hash[:FAB_HASH_TRUNCATION]}"))
    return found[0] if len(found) == 1 and (found[0] / "pyproject.toml").is_file() else None


def installed_app() -> Callable[..., Message]:
    """The ClientApp of the fedslide package installed at this site (`COMPONENTS["clientapp"]`)."""
    module, _, attribute = COMPONENTS["clientapp"].partition(":")
    app: Callable[..., Message] = getattr(importlib.import_module(module), attribute)
    return app


def ledger_refusal(message: Message, context: Context, error: Error) -> None:
    """Write a refusal to the run's egress ledger with the installed app's own ledger code, where the run has a
    site directory (a refusal is sent whether or not it could be ledgered)."""
    client_app = importlib.import_module("fedslide.client.client_app")  # the installed one (preloaded)
    try:
        ledger = client_app._error_ledger(message, context, None)  # noqa: SLF001 - the app's own ledger rules
        if ledger is not None:
            config = message.content.config_records.get(CONFIG)
            round_ = client_app._round(config) if config is not None else 0  # noqa: SLF001
            ledger.append_error(client_app._phase_of(message), round_, error)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - the refusal is logged and sent either way
        log.exception("the refusal could not be written to the run's egress ledger")


def answer_with_installed_app(fab: bytes) -> Callable[..., Message]:
    """What answers a task whose FAB is `fab`: the installed ClientApp once the FAB passes `vet_fab` under the
    task's node config; otherwise an error reply (CODE_REFUSED and the refusal's fixed text), logged and ledgered
    here."""

    def answer(message: Message, context: Context) -> Message:
        refusal = vet_fab(fab, context.node_config)
        if refusal is None:
            return installed_app()(message=message, context=context)
        error = error_of(ErrorCode.CODE_REFUSED, REFUSALS[refusal.kind])
        log.error(
            "REFUSED the %s message of run %s: %s (%s); none of the FAB's code ran, and only this refusal is sent",
            message.metadata.message_type,
            context.run_id,
            error.reason,
            refusal.detail,
        )
        ledger_refusal(message, context, error)
        return Message(error, reply_to=message)

    return answer


def _clientapp_args(spec: ExecutionSpec) -> dict[str, Any]:
    return {
        "runtime_api_address": spec.runtime_api_address,
        "token": spec.token,
        "insecure": spec.insecure,
        "certificates": validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        "parent_pid": spec.parent_pid,
        "runtime_dependency_install": spec.runtime_dependency_install,
    }


def run_installed_task(spec: ExecutionSpec) -> None:
    """In the forked child (the default): Flower's ClientApp process body for the task, answered by the installed
    ClientApp after the FAB's check (`answer_with_installed_app`); the FAB is never installed or imported."""
    run_clientapp_without_fab(answer_with_installed_app, **_clientapp_args(spec))


def run_task(spec: ExecutionSpec, warm_dir: Path | None = None) -> None:
    """In the forked child, with FAB code allowed: forget the app's modules unless they are the task's FAB's
    (`warm_dir`, see `ForkExecutor.warm_up`), then run Flower's ClientApp process body, which loads the FAB's app."""
    if warm_dir is not None and spec.fab_hash:
        reuse_installed_fab(spec.fab_hash, warm_dir)
    else:
        forget_app_modules()
    flower_compat.run_clientapp(**_clientapp_args(spec))  # Flower's ClientApp process body (PRELOAD)


class ForkExecutor:
    """A Flower SuperExec executor for ClientApp tasks: one child forked from this process per task, which runs the
    installed ClientApp (or, with `allow_fab_code`, the FAB's)."""

    def __init__(self, site_dir: Path | None = None, feature_bytes: int = 0, allow_fab_code: bool = False) -> None:
        self.allow_fab_code = allow_fab_code
        self.site_dir = site_dir  # whose feature files to hold for the tasks (None: each task reads them)
        self.feature_bytes = feature_bytes
        self._features_left = 0  # files that did not fit or could not be read at the last check
        self._features_problem = ""  # why the last check could not hold them ("" when it could)
        self._context = multiprocessing.get_context("fork")
        self.children: list[BaseProcess] = []
        self.launched = 0
        self.fab_of: dict[str, str | None] = {}  # child name -> the FAB hash of its task
        self.warm_fab: str | None = None  # the FAB whose app modules this process has imported (`warm_up`)
        self.warm_dir: Path | None = None
        self._cold_fabs: set[str] = set()  # FABs whose import here failed: their tasks run cold

    def get_eligible_capacity(
        self, supported_task_types: set[TaskType], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[TaskType], set[str]]:
        """ClientApp tasks only (the SuperNode's only kind), never a capacity wait."""
        return {t for t in supported_task_types if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(
        self,
        task_type: TaskType | None = None,
        *,
        fab_hash: str | None = None,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> None:
        """Forking has no capacity gate."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork the child that runs the task."""
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"the fedslide SuperExec runs ClientApp tasks only, not {spec.task_type}")
        name = f"clientapp-task-{spec.task_id}"
        warm_dir = None
        if self.allow_fab_code:
            warm_dir = self.warm_dir if spec.fab_hash and spec.fab_hash == self.warm_fab else None
            child = self._context.Process(target=run_task, args=(spec, warm_dir), name=name)
        else:
            child = self._context.Process(target=run_installed_task, args=(spec,), name=name)
        child.start()
        self.children.append(child)
        self.fab_of[child.name] = spec.fab_hash
        self.launched += 1
        log.info(
            "task %d: %s in forked process %d%s",
            spec.task_id,
            "the FAB's ClientApp" if self.allow_fab_code else "the installed ClientApp",
            child.pid,
            " (app imported)" if warm_dir is not None else "",
        )
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the children that have finished; after a task that succeeded, (re-)hold the site's features, and
        with FAB code allowed, first import the app of a FAB whose first task it was."""
        running = []
        for child in self.children:
            if child.is_alive():
                running.append(child)
                continue
            fab = self.fab_of.pop(child.name, None)
            if child.exitcode != 0:
                continue
            if not self.allow_fab_code:
                self.hold_features()
                continue
            if fab and fab != self.warm_fab and fab not in self._cold_fabs:
                self.warm_up(fab)
            if fab and fab == self.warm_fab:
                self.hold_features()
        self.children = running

    def hold_features(self) -> bool:
        """Hold (or re-check) the site's feature files with the app's own code for the next tasks; False when
        there is nothing to hold or it failed (the tasks then read the files themselves)."""
        app_imported = not self.allow_fab_code or self.warm_fab is not None  # the installed app: preloaded
        if self.site_dir is None or self.feature_bytes <= 0 or not app_imported:
            return False
        started = time.perf_counter()
        try:
            store, read, left = importlib.import_module("fedslide.client.site_run").hold_site_features(
                self.site_dir, self.feature_bytes
            )
        except Exception as exc:  # noqa: BLE001 - a bad site is reported by the tasks that read it
            if str(exc) != self._features_problem:  # once per problem, not after every task
                log.warning("not holding the feature files of %s (the tasks read them): %s", self.site_dir, exc)
            self._features_problem = str(exc)
            return False
        self._features_problem = ""
        if read or left != self._features_left:
            log.info(
                "holding %d feature file(s) of %s for the tasks (%.1f MB; %d read in %.2f s; %d left on disk)",
                len(store),
                self.site_dir,
                store.nbytes / 1e6,
                read,
                time.perf_counter() - started,
                left,
            )
        self._features_left = left
        return True

    def warm_up(self, fab_hash: str) -> bool:
        """With FAB code allowed only: import the app from the directory its FAB is installed in, in place of the
        modules imported so far; False (and this FAB's tasks keep importing it themselves) when that fails."""
        if not self.allow_fab_code:
            raise RuntimeError(
                "the FAB's code is imported only with allow_fab_code (fedslide superexec --allow-fab-code)"
            )
        fab_dir = installed_fab_dir(fab_hash)
        if fab_dir is None:
            self._cold_fabs.add(fab_hash)
            return False
        started = time.perf_counter()
        if self.warm_dir is not None and str(self.warm_dir) in sys.path:
            sys.path.remove(str(self.warm_dir))
        release = getattr(sys.modules.get("fedslide.client.site_run"), "release_site_features", None)
        if release is not None:  # the old app's copy of the site's feature files goes with its modules
            release()
        forget_app_modules()
        sys.path.insert(0, str(fab_dir))
        try:
            for module in APP_MODULES:
                importlib.import_module(module)
        except Exception:  # noqa: BLE001 - whatever the FAB's code raises on import, its tasks report it themselves
            log.exception(
                "importing the app of FAB %s from %s failed; its tasks import it themselves", fab_hash[:12], fab_dir
            )
            forget_app_modules()
            sys.path.remove(str(fab_dir))
            self.warm_fab, self.warm_dir = None, None
            self._cold_fabs.add(fab_hash)
            return False
        self.warm_fab, self.warm_dir = fab_hash, fab_dir
        log.info("imported the app of FAB %s from %s in %.2f s", fab_hash[:12], fab_dir, time.perf_counter() - started)
        return True

    def close(self) -> None:
        """Nothing to release: a running task ends itself when this process goes (its parent-pid monitor)."""


def _parent_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_runtime_api(address: str, parent_pid: int | None, poll: float = 0.2) -> bool:
    """Wait until the SuperNode's Runtime API accepts connections (both processes start side by side); False
    when the SuperNode is gone first."""
    host, _, port = address.rpartition(":")
    while _parent_alive(parent_pid):
        if port_open(host.strip("[]") or "127.0.0.1", int(port)):
            return True
        time.sleep(poll)
    return False


def serve(
    runtime_api_address: str,
    insecure: bool,
    root_certificates_path: str | None = None,
    auth_secret: bytes | None = None,
    parent_pid: int | None = None,
    poll: float = POLL_S,
    site_dir: Path | None = None,
    feature_memory_gb: float = FEATURE_MEMORY_GB,
    allow_fab_code: bool = False,
) -> None:
    """Preload, wait for the SuperNode's Runtime API, then acquire ClientApp tasks from it and fork one child per
    task until SIGTERM/SIGINT (or until `parent_pid`, the SuperNode, is gone)."""
    if allow_fab_code:
        log.warning(
            "--allow-fab-code: this site runs the ClientApp code of whatever FAB a coordinator submits, not its "
            "installed fedslide (its egress checks and ledger included); for development only"
        )
    started = time.perf_counter()
    shorten_object_pulls()  # inherited by every child: it pulls the message's arrays without a 1 s back-off
    for module in PRELOAD:
        importlib.import_module(module)
    log.info(
        "preloaded %d modules in %.1f s; runtime API %s",
        len(sys.modules),
        time.perf_counter() - started,
        runtime_api_address,
    )
    if not wait_for_runtime_api(runtime_api_address, parent_pid):
        log.info("the SuperNode (pid %s) is gone before its Runtime API came up; stopping", parent_pid)
        return
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=auth_secret, protected_methods=_AUTH_METHODS))
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )
    executor = ForkExecutor(site_dir, int(feature_memory_gb * 2**30), allow_fab_code)
    plugin = AutoExecPlugin(
        runtime_api_address=runtime_api_address,
        insecure=insecure,
        root_certificates_path=root_certificates_path,
        runtime_dependency_install=False,
        executor=executor,
    )
    register_signal_handlers(
        event_type=EventType.RUN_SUPEREXEC_LEAVE,
        exit_message="fedslide SuperExec stopped.",
        exit_handlers=[client.close, executor.close],
    )
    while _parent_alive(parent_pid):
        executor.reconcile()
        task_types, fab_hashes = executor.get_eligible_capacity(set(plugin.supported_task_types))
        try:
            reply = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=task_types, agentapp_fab_hashes=fab_hashes)
            )
        except Exception:  # the SuperNode restarting or gone: the loop condition decides
            if not _parent_alive(parent_pid):
                break
            log.exception("AcquireTask failed; retrying")
            time.sleep(1.0)
            continue
        if reply.HasField("task") and reply.token:
            result = plugin.launch_task(token=reply.token, task=reply.task)
            if result.message:
                log.error("task %d not launched: %s", reply.task.task_id, result.message)
        time.sleep(poll)
    log.info("the SuperNode (pid %s) is gone; stopping after %d task(s)", parent_pid, executor.launched)
    client.close()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "superexec",
        help="a site's SuperExec that runs each ClientApp message in a pre-warmed process (SuperNode --isolation process)",
        description="Run next to a `flower-supernode --isolation process`: acquires its ClientApp tasks and runs each "
        "in a child forked from this process, which has imported torch and Flower once (Flower's own SuperExec "
        "pays ≈ 3 s of CPU for that on every message).",
    )
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)")
    security = p.add_mutually_exclusive_group(required=True)
    security.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (loopback)")
    security.add_argument("--root-certificates", default=None, help="CA certificate of the Runtime API's TLS")
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the SuperNode) is gone")
    p.add_argument("--poll", type=float, default=POLL_S, help=f"seconds between task polls (default {POLL_S})")
    p.add_argument(
        "--site-dir",
        type=Path,
        default=None,
        help="the site directory (the SuperNode's site-dir): hold its feature files in memory for the tasks",
    )
    p.add_argument(
        "--feature-memory-gb",
        type=float,
        default=FEATURE_MEMORY_GB,
        help=f"the most feature arrays held for the tasks, GiB (default {FEATURE_MEMORY_GB:g}; 0: none)",
    )
    p.add_argument(
        "--allow-fab-code",
        action="store_true",
        help="development only: run the ClientApp code of the FAB the coordinator sent instead of the installed "
        "fedslide's (default: the installed code, and a FAB that is not the installed version is refused)",
    )
    add_superexec_auth_secret_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    disable_process_dumping(strict=False)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    secret = None
    if args.superexec_auth_secret_file is not None:
        secret = load_superexec_auth_secret(secret_file=args.superexec_auth_secret_file)
    serve(
        args.runtime_api_address,
        args.insecure,
        args.root_certificates,
        secret,
        args.parent_pid,
        args.poll,
        args.site_dir,
        args.feature_memory_gb,
        args.allow_fab_code,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fedslide.client.superexec ARGS`: the same as `fedslide superexec ARGS`, from the site's own code."""
    parser = argparse.ArgumentParser(prog="fedslide")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["superexec", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.handler(args))


if __name__ == "__main__":  # pragma: no cover
    from fedslide.client.superexec import main as imported_main  # run under the module's own name (logger, fork)

    sys.exit(imported_main())
