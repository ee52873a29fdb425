"""`fedslide federate`: a whole consortium on this host, the way a real one runs.

Checks every site before anything starts, makes TLS and SuperNode-authentication material, starts
`flower-superlink` (TLS, node auth) and one SuperNode per site (own port, own key; Flower's, with short
polls: `client.supernode`) beside its warm SuperExec, submits the app with `flwr run` while the sites register
and start, follows the ServerApp's log stream until the run ends while watching every process, and stops
everything it started.
A failure exits non-zero with the failing process's log tail.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedslide.client.supernode import SuperNode
from fedslide.common.cli_support import (
    EXIT_ERROR,
    EXIT_OK,
    ConfigError,
    add_config_arguments,
    config_from_args,
)
from fedslide.common.config.federation import FederationConfig
from fedslide.common.distillation.data import load_sites
from fedslide.common.flower_app import APP_DIR, stage_app, write_run_config
from fedslide.common.processes import ProcessFailed, free_port, tail
from fedslide.deploy.certs import load_ca, make_all
from fedslide.server.superlink import FlowerCli, FlowerCliError, SuperLink, TLSFiles

log = logging.getLogger(__name__)

FINISHED = "finished"


class FederationFailed(RuntimeError):
    """The federated run failed; the message names where and shows the relevant log tail."""


@dataclass
class Consortium:
    """The processes of a running federation on this host (what `LaunchOptions.on_submitted` receives)."""

    link: Any  # server.superlink.SuperLink
    nodes: list[Any]  # client.supernode.SuperNode per site
    cli: Any  # server.superlink.FlowerCli
    run_id: int  # Flower's run id
    run_dir: Path


@dataclass
class LaunchOptions:
    """How the consortium is started on this host."""

    work_dir: Path
    insecure: bool = False
    node_auth: bool = True
    timeout: float = 3600.0
    poll: float = 60.0  # seconds between `flwr ls` calls while the ServerApp's log streams (each is a Python process)
    threads_per_site: int | None = None
    warm: bool = True  # fedslide's SuperExec at each site (client.superexec); False: Flower's, a process per message
    on_submitted: Callable[[Consortium], None] | None = None  # e.g. a test that kills a process mid-run
    node_options: dict[str, str] = field(default_factory=dict)  # more node config at every site (e.g. privacy floors)


def preflight(sites: list[Path], cfg: FederationConfig) -> None:
    """Refuse bad site directories before any process starts: each site's labels and feature files are read."""

    if len(sites) < cfg.min_nodes:
        raise ConfigError(f"{len(sites)} site(s) given, fewer than min-nodes = {cfg.min_nodes}")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"site directory names must differ (they name the sites): {names}")
    problems = []
    for site in sites:
        if not site.is_dir():
            problems.append(f"{site}: no such site directory")
            continue
        try:
            data = load_sites([site], cfg.encoder, seed=cfg.seed, carving=cfg.carve)  # carves what a site lacks
        except Exception as exc:  # every load problem is reported, then nothing starts
            problems.append(f"{site}: {exc}")
            continue
        if len(set(data.labels.tolist())) < 2:
            problems.append(
                f"{site}/labels.csv: a single class ({data.classes[int(data.labels[0])]!r}); "
                "each site needs slides of at least two classes"
            )
    if cfg.mode == "logits" and cfg.proxy_dir is not None and not Path(cfg.proxy_dir).is_dir():
        problems.append(f"proxy-dir {cfg.proxy_dir}: no such directory")
    if problems:
        raise ConfigError("refusing to start the federation:\n  " + "\n  ".join(problems))


def run_consortium(sites: list[Path], cfg: FederationConfig, opts: LaunchOptions) -> Path:
    """Start SuperLink + SuperNodes, run the app, stop everything; the run directory at the coordinating site."""

    preflight(sites, cfg)
    work = opts.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(
        update={
            "runs_dir": (cfg.runs_dir or work / "runs").resolve(),
            "expected_nodes": len(sites),  # the launcher knows how many it starts
            "threads": cfg.threads or opts.threads_per_site,
            "run_id": cfg.run_id or time.strftime("run-%Y%m%d-%H%M%S"),
        }
    )
    run_dir = Path(cfg.runs_dir) / cfg.run_id  # type: ignore[arg-type]
    certs = work / "certs"
    tls = None
    keys: dict[str, Path | None] = {s.name: None for s in sites}
    if opts.insecure:
        log.warning("INSECURE: TLS and SuperNode authentication are off; anyone on the network can read the traffic")
    else:
        material = (
            make_all(certs, [s.name for s in sites], ["localhost"], ["127.0.0.1"])
            if not _has_material(certs, sites)
            else None
        )
        ca = material.ca if material else load_ca(certs)
        tls = TLSFiles(ca=ca.cert, cert=certs / "server.pem", key=certs / "server.key")
        if opts.node_auth:
            keys = {s.name: certs / f"{s.name}.key" for s in sites}
    port = free_port()
    # Flower's in-memory state and object store: a SQLite database stores and serves every message's objects
    # several times slower (docs/federation.md). The link lives for this run only; a resumed
    # run starts a new one, and the ServerApp re-admits the sites by name under their new node ids.
    link = SuperLink(work / "superlink", tls, port=port, node_auth=not opts.insecure and opts.node_auth, in_memory=True)
    cli = FlowerCli(work / "flwr-home", link.address, tls.ca if tls else None)
    config_file = work / f"run-config-{cfg.run_id}.toml"
    write_run_config(config_file, cfg)
    with ExitStack() as stack:
        _stop_on_sigterm(stack)
        log.info("starting SuperLink on %s (%s)", link.address, "TLS + node auth" if tls else "insecure")
        link.start()
        stack.callback(link.stop)
        nodes = [
            SuperNode(
                site.name,
                site,
                link.address,
                free_port(),
                work / "supernodes",
                tls.ca if tls else None,
                keys[site.name],
                warm=opts.warm,
                node_options=opts.node_options,
            )
            for site in sites
        ]
        stack.callback(stop_nodes, nodes)
        finished = threading.Event()
        public_keys = [certs / f"{site.name}.pub" for site in sites] if tls is not None and opts.node_auth else []
        with ThreadPoolExecutor(1 + len(public_keys)) as pool:
            # `flwr run` builds and submits the app while the sites register and start: the ServerApp waits for
            # them (expected-nodes); each `flwr` call is a Python process, so they all run side by side
            submission = pool.submit(cli.submit, stage_app(APP_DIR, work / "app"), config_file)
            stack.callback(lambda: None if finished.is_set() else _stop_submitted(cli, submission))
            list(pool.map(cli.register, public_keys))
            for node in nodes:  # all start side by side, then each is waited for
                node.launch()
            run_id = submission.result()  # a refused app fails here, before waiting for the sites
            for node in nodes:
                node.wait_ready()
        log.info("submitted run %s (Flower run %d); outputs in %s", cfg.run_id, run_id, run_dir)
        if opts.on_submitted is not None:
            opts.on_submitted(Consortium(link, nodes, cli, run_id, run_dir))
        whole_log: Path | None = None
        try:
            whole_log = _wait(cli, run_id, link, nodes, opts, run_dir, work / f"serverapp-{run_id}.log")
            finished.set()
        finally:
            _collect_logs(work, run_dir, cli, run_id, nodes, whole_log)
    if not (run_dir / "metrics.json").is_file():
        text = cli.logs(run_id)
        raise FederationFailed(
            f"the run finished without {run_dir / 'metrics.json'}: {first_error(text)}\nServerApp log:\n{text[-3000:]}"
        )
    return run_dir


_ERROR_LINE = re.compile(r"\b(\w*(Error|Exception)|FAILED|refused)\b")


def first_error(log_text: str) -> str:
    """The first error a ServerApp log records (the cause; later lines are often its consequences)."""
    for line in log_text.splitlines():
        if _ERROR_LINE.search(line) and not line.lstrip().startswith(("Traceback", "File ")):
            return "first error in the ServerApp log: " + line.strip()
    return "the ServerApp log records no error (see its tail below)"


def _stop_on_sigterm(stack: ExitStack) -> None:
    """SIGTERM (a `timeout`, a scheduler) unwinds like Ctrl-C, so every process started is stopped."""
    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    stack.callback(signal.signal, signal.SIGTERM, previous)


def stop_nodes(nodes: list[Any]) -> None:
    """Stop every site's SuperNode (and SuperExec) side by side."""
    with ThreadPoolExecutor(max(len(nodes), 1)) as pool:
        list(pool.map(lambda node: node.stop(), nodes))


def _stop_submitted(cli: Any, submission: Future) -> None:
    """Stop a run that was submitted but not seen to finish (best effort)."""
    if submission.done() and submission.exception() is None:
        cli.stop_run(submission.result())


def _collect_logs(work: Path, run_dir: Path, cli: Any, run_id: int, nodes: list[Any], whole_log: Path | None) -> None:
    """The ServerApp's log and every process log of this host, under `<run_dir>/logs/` (the sites' processes are
    stopped meanwhile). The ServerApp's log is the streamed one when a single stream ran to the run's end
    (`whole_log`), else it is fetched from the SuperLink."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if whole_log is not None:
        stop_nodes(nodes)
        shutil.copyfile(whole_log, logs / "serverapp.log")
    else:
        with ThreadPoolExecutor(1) as pool:
            server_log = pool.submit(cli.logs, run_id)
            stop_nodes(nodes)
            try:
                text = server_log.result()
            except Exception as exc:  # the SuperLink may be gone; its own log is copied below
                text = f"could not fetch the ServerApp log: {exc}\n"
        (logs / "serverapp.log").write_text(text)
    for path in [work / "superlink" / "superlink.log", *sorted((work / "supernodes").glob("*.log"))]:
        if path.is_file():
            shutil.copyfile(path, logs / path.name)


def _has_material(certs: Path, sites: list[Path]) -> bool:
    needed = ["ca.crt", "ca.key", "server.pem", "server.key"] + [f"{s.name}.{e}" for s in sites for e in ("key", "pub")]
    return all((certs / n).is_file() for n in needed)


def _wait(
    cli: Any, run_id: int, link: Any, nodes: list[Any], opts: LaunchOptions, run_dir: Path, stream_log: Path
) -> Path | None:
    """Wait for the run while watching every process; `stream_log` when it holds the ServerApp's whole log.

    The ServerApp's log streams into `stream_log` (one `flwr log --stream` process), and the stream's end is the
    run's end: only then, and every `opts.poll` s meanwhile, is the run's status asked (`flwr ls`, a Python process
    each time). A stream that breaks while the run goes on is opened again, at most every `opts.poll` s.
    """
    deadline = time.monotonic() + opts.timeout
    stream = cli.stream_logs(run_id, stream_log)
    opened = asked = time.monotonic()
    streaming, whole = True, True  # the stream is open; one stream has seen the run from its start
    last = ""
    try:
        while time.monotonic() < deadline:
            ended = streaming and not stream.alive
            if ended:
                streaming = False
            if ended or time.monotonic() - asked >= opts.poll:
                asked = time.monotonic()
                state, details = _status(cli, run_id, link, run_dir)
                if state != last:
                    log.info("run status: %s", state)
                    last = state
                if state.startswith(FINISHED):
                    if "completed" not in state and "completed" not in details:
                        text = cli.logs(run_id)
                        raise FederationFailed(
                            f"run {run_dir.name} ended as {state} {details}: {first_error(text)}\n"
                            "ServerApp log tail:\n" + "\n".join(text.splitlines()[-40:])
                        )
                    complete = _stream_ends(stream) and whole
                    return stream_log if complete else None
                if ended:
                    log.warning("the ServerApp's log stream ended while the run is %s: %s", state, tail(stream.log, 5))
                    whole = False
            if not streaming and time.monotonic() - opened >= opts.poll:
                stream = cli.stream_logs(run_id, stream_log.with_suffix(f".{int(time.time())}.log"))
                opened, streaming = time.monotonic(), True
            if link.process is not None and not link.process.alive:
                raise FederationFailed(str(link.process.failure("died during the run")))
            for node in nodes:  # a SuperNode may drop out (the rounds go on without it), its SuperExec alone may not
                if (
                    node.process is not None
                    and node.process.alive
                    and node.superexec is not None
                    and not node.superexec.alive
                ):
                    raise FederationFailed(str(node.superexec.failure("died during the run")))
            time.sleep(0.5)
        raise FederationFailed(
            f"run {run_dir.name} not finished after {opts.timeout:.0f} s; ServerApp log tail:\n"
            + "\n".join(cli.logs(run_id).splitlines()[-40:])
        )
    finally:
        stream.stop()


def _status(cli: Any, run_id: int, link: Any, run_dir: Path) -> tuple[str, str]:
    """The run's status and its details (`flwr ls`); a dead SuperLink is reported as the failure it is."""

    try:
        status = cli.status(run_id)
    except FlowerCliError as exc:  # a dead SuperLink shows first as a CLI failure: report the process
        if link.process is not None and not link.process.alive:
            raise FederationFailed(str(link.process.failure("died during the run"))) from exc
        raise FederationFailed(f"cannot read the status of run {run_dir.name}: {exc}") from exc
    return str(status.get("status", "")), str(status.get("status-details", ""))


def _stream_ends(stream: Any, timeout: float = 10.0) -> bool:
    """Whether the log stream of a finished run ends by itself, having printed everything (the SuperLink ends it
    within a second of the run's end)."""
    try:
        return stream.proc.wait(timeout) == 0
    except subprocess.TimeoutExpired:
        return False


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "federate",
        help="run the federation on this host: SuperLink + one SuperNode per site (TLS, node auth), `flwr run`",
        description="Start a SuperLink and one SuperNode per site directory on this host (TLS and SuperNode "
        "authentication on), run the federated teacher -> experts -> low-res student protocol, stop every process. "
        "Settings: the [federation] section of --config, --set key=value.",
    )
    p.add_argument("--sites", type=Path, nargs="+", required=True, help="site directories (labels.csv + features/)")
    p.add_argument(
        "--work", type=Path, default=Path("federation"), help="certificates, logs and runs (default ./federation)"
    )
    p.add_argument("--run-id", default=None, help="run name (default: from the time)")
    p.add_argument("--resume", metavar="RUN_ID", default=None, help="continue RUN_ID from its last checkpoint")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (prints a warning)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is declared failed")
    add_config_arguments(p, example="rounds.teacher=10")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    values: dict[str, Any] = {}
    if args.resume:
        values.update({"run_id": args.resume, "resume": True})
    elif args.run_id:
        values["run_id"] = args.run_id
    cfg = config_from_args(FederationConfig, args, "federation", values)
    try:
        run_dir = run_consortium(list(args.sites), cfg, LaunchOptions(args.work, args.insecure, timeout=args.timeout))
    except (FederationFailed, ProcessFailed) as exc:
        print(f"fedslide federate: FAILED\n{exc}")
        return EXIT_ERROR
    print(
        f"federated run finished: {run_dir}\n  metrics: {run_dir / 'metrics.json'}\n  report: {run_dir / 'report.md'}"
    )
    return EXIT_OK
