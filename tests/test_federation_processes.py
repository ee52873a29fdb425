"""The federation with REAL Flower processes on loopback: `flower-superlink` + one `flower-supernode` per site.

What `tests/test_federation.py` checks in-process, checked here over the wire, with TLS (certificates made by
`deploy.certs`) and SuperNode authentication (registered per-site keys), on free ports in temp directories:

- a whole run through `run_consortium`: outputs, a site with another encoder refused at the handshake, every
  site's egress ledger free of slide ids, the process logs collected, and no process left behind;
- identity: a SuperNode that does not trust the SuperLink's certificate (other CA), one whose key is not
  registered, and a SuperLink whose certificate has expired, all stay offline, while the registered one with
  the right CA comes online;
- a SuperNode killed mid-round: the round completes without it, the absence is recorded in metrics.json, and
  the restarted node (same key, same node id; started as a hospital runs it, `fedslide-supernode` in Flower's
  subprocess isolation, which starts fedslide's warm SuperExec itself) takes part again;
- the SuperLink killed mid-phase: `run_consortium` fails, and `resume` finishes the run without redoing
  completed phases (on a new SuperLink, under which the sites come back with new node ids, matched by name).

The runs use fedslide's warm SuperExec at each site (client.superexec; the full run checks that every message
ran in one of its forked processes), except the kill test, whose first three sites run Flower's own (a fresh
`flwr-clientapp` per message). A round trip still costs seconds here, and a killed SuperNode is noticed only after its heartbeat
timeout (~60 s): the module takes several minutes. Every process a test
starts (and every process those start) is stopped in a finalizer, also when the test fails.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedslide.client.supernode import SuperNode
from fedslide.deploy.cli import main
from fedslide.common.config.federation import FederationConfig
from fedslide.deploy.federate import Consortium, FederationFailed, LaunchOptions, run_consortium
from fedslide.common.flower_env import QUIET_FLOWER, SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S
from fedslide.common.processes import ManagedProcess, ProcessFailed, free_port
from fedslide.deploy.certs import make_all, make_ca, make_server_cert
from fedslide.server.superlink import FlowerCli, FlowerCliError, SuperLink, TLSFiles
from tests.feature_sites import make_site

pytestmark = pytest.mark.slow  # real SuperLink/SuperNode processes
TINY_MODEL = {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.0}
ONE_ROUND = {
    "adapter": 1,
    "teacher": 1,
    "experts": 1,
    "baseline": 1,
    "student": 1,
    "cluster_iterations": 1,
    "local_epochs": 1,
    "adapter_local_epochs": 1,
}
ALL_PHASES = {
    "handshake",
    "adapter",
    "teacher",
    "cluster-init",
    "cluster-stats",
    "experts",
    "kd-cache",
    "student",
    "evaluate",
}
OTHER_HASH = "ffff0000"
REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 900.0  # a hung run fails the test instead of hanging it


def tiny_config(run_id: str, rounds: dict[str, int] | None = None, **extra: Any) -> FederationConfig:
    return FederationConfig(
        run_id=run_id,
        seed=0,
        threads=1,
        rounds={**ONE_ROUND, **(rounds or {})},
        teacher=TINY_MODEL,
        student=TINY_MODEL,
        adapter={"hidden_dim": 16},
        clusters={"num_clusters": 2},
        training={"lr": 1e-2},
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# processes: every one a test starts, and everything those start, is stopped at teardown
# ---------------------------------------------------------------------------------------------
class ProcessTracker:
    """Remembers every process the test started and (polling in a thread) all their descendants.

    Descendants are recorded by (pid, create time), so a later process reusing a pid is never confused with
    ours; `alive()` lists the recorded ones still running, `stop_all()` ends the test's processes and kills
    whatever descendant survives them.
    """

    def __init__(self) -> None:
        self.stoppables: list[Any] = []  # SuperLink / SuperNode objects (their stop() is idempotent)
        self.roots: list[ManagedProcess] = []
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self.cmdlines: dict[tuple[int, float], str] = {}  # as last seen running
        self.quiet: dict[tuple[int, float], dict[str, str | None]] = {}  # its QUIET_FLOWER variables, read with it
        self._lock = threading.Lock()
        self._own_children = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="process-tracker", daemon=True)
        self._thread.start()

    def add(self, thing: Any) -> Any:
        """Track a SuperLink/SuperNode (its process once started) or a ManagedProcess; returns it."""
        with self._lock:
            if isinstance(thing, ManagedProcess):
                self.roots.append(thing)
            else:
                self.stoppables.append(thing)
        self.snapshot()
        return thing

    def follow_children(self) -> None:
        """Also record every descendant of this test process (what a launcher starts before a test sees it)."""
        self._own_children = True
        self.snapshot()

    def add_consortium(self, consortium: Consortium) -> None:
        for thing in (consortium.link, *consortium.nodes):
            self.add(thing)

    def _processes(self) -> list[ManagedProcess]:
        with self._lock:
            managed = list(self.roots) + [
                p for s in self.stoppables for p in getattr(s, "processes", [s.process]) if p is not None
            ]
        return managed

    def snapshot(self) -> None:
        """Record the tracked processes, their descendants, and whatever is left in their process groups
        (a SuperNode's SuperExec stays in the SuperNode's group when the SuperNode exits first)."""
        groups = set()
        if self._own_children:
            for proc in psutil.Process().children(recursive=True):
                self._record(proc)
        for managed in self._processes():
            groups.add(managed.proc.pid)  # ManagedProcess starts a new session: pgid == pid
            try:
                root = psutil.Process(managed.proc.pid)
                family = [root, *root.children(recursive=True)]
            except psutil.Error:
                family = []
            for proc in family:
                self._record(proc)
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in groups:
                    self._record(proc)
            except (OSError, psutil.Error):
                continue

    def _record(self, proc: psutil.Process) -> None:
        try:
            key = (proc.pid, proc.create_time())
            command, environ = " ".join(proc.cmdline()), proc.environ()
            # read again at every sighting: a child caught between fork and exec still shows this test's command
            # line (or, inside exec, none); exec replaces it once, and an exiting process reads as empty
            with self._lock:  # the polling thread records too
                if key not in self.seen or (command and command != self.cmdlines[key]):
                    self.seen[key] = proc
                    self.cmdlines[key] = command
                    self.quiet[key] = {name: environ.get(name) for name in QUIET_FLOWER}
        except psutil.Error:
            pass

    def _poll(self) -> None:
        while not self._done.wait(0.5):
            self.snapshot()

    def alive(self) -> list[str]:
        """The recorded processes still running (zombies count as gone)."""
        out = []
        for proc in list(self.seen.values()):
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
            except psutil.Error:
                continue
        return out

    def commands(self) -> list[str]:
        """The command line of every recorded process, as last seen running (those gone included)."""
        with self._lock:
            return list(self.cmdlines.values())

    def stop_all(self) -> None:
        self.snapshot()
        self._done.set()
        self._thread.join(5)
        for thing in reversed(self.stoppables):
            try:
                thing.stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                pass
        for managed in self.roots:
            managed.stop()
        for proc in list(self.seen.values()):
            try:
                if proc.is_running():
                    proc.kill()
            except psutil.Error:
                continue


@pytest.fixture
def tracker() -> Iterator[ProcessTracker]:
    tracked = ProcessTracker()
    try:
        yield tracked
    finally:
        tracked.stop_all()


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three sites with the federation's encoder, and a fourth whose files name other encoder weights."""
    root = tmp_path_factory.mktemp("proc-sites")
    good = [make_site(root, f"site{i}", {"train": 8, "val": 4, "test": 4}, seed=i) for i in range(1, 4)]
    other = make_site(root, "site4", {"train": 6, "val": 2, "test": 2}, seed=9, weights_hash=OTHER_HASH)
    return [*good, other]


def slide_ids(sites: list[Path]) -> set[str]:
    return {line.split(",")[0] for s in sites for line in (s / "labels.csv").read_text().splitlines()[1:]}


def ledger(site: Path, run_id: str) -> list[dict[str, Any]]:
    path = site / "runs" / run_id / "egress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_state(run_dir: Path) -> dict[str, Any]:
    """The server checkpoint's state.json ({} while absent or being replaced)."""
    try:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def in_thread(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    """Run `target` in a daemon thread; its exception (if any) lands in the returned list."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, errors


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return condition()


# ---------------------------------------------------------------------------------------------
# 1. a whole run
# ---------------------------------------------------------------------------------------------
def test_full_run_with_tls_and_a_refused_encoder(sites: list[Path], tmp_path: Path, tracker: ProcessTracker) -> None:
    seen: list[Consortium] = []

    def submitted(consortium: Consortium) -> None:
        seen.append(consortium)
        tracker.add_consortium(consortium)

    cfg = tiny_config("tls")
    run_dir = run_consortium(sites, cfg, LaunchOptions(tmp_path / "work", timeout=RUN_TIMEOUT, on_submitted=submitted))
    tracker.snapshot()

    # nothing left running: the SuperLink, the SuperNodes, their SuperExecs and everything they started
    assert len(seen) == 1
    consortium = seen[0]
    assert consortium.run_dir == run_dir and consortium.run_id > 0
    assert consortium.link.address.startswith("127.0.0.1:") and consortium.link.tls is not None
    for managed in [consortium.link.process, *(p for n in consortium.nodes for p in n.processes)]:
        assert managed is not None and not managed.alive, managed.name
    assert len(tracker.seen) > 1 + 2 * len(sites)  # the children (ServerApp, ClientApp tasks) were seen too
    # the SuperLink's SuperExec runs in a session of its own (Flower detaches it): it ends when it sees its
    # parent gone, a moment after the SuperLink
    assert wait_until(lambda: not tracker.alive(), 10, poll=0.5), tracker.alive()
    # every message a site answered ran in a child forked by its warm SuperExec, none in a cold flwr-clientapp
    assert not [p for p in tracker.commands() if "flwr-clientapp" in p]
    # no Flower process of the run may phone home: telemetry and update checks off in every one of them
    loud = {tracker.cmdlines[key][:120]: env for key, env in tracker.quiet.items() if env != QUIET_FLOWER}
    assert not loud, loud
    assert len(tracker.quiet) == len(tracker.seen)
    for node, site in zip(consortium.nodes, sites):
        assert node.warm and node.superexec is not None, node.name
        log = node.superexec.log.read_text()
        forked = log.count("the installed ClientApp in forked process")
        assert forked == len(ledger(site, "tls")) > 0, (node.name, forked)
        # every task ran the site's installed app (the FAB, built from the same code, was accepted), none the FAB's
        assert "imported the app of FAB" not in log and "REFUSED" not in log, node.name
        # with the app imported, the SuperExec held the site's feature files, and every task after that read all
        # of them from its memory, none from disk
        from_memory = re.findall(r": (\d+) of (\d+) feature files from memory", log)
        if forked > 1:
            assert "holding " in log and len(from_memory) > 1, (node.name, from_memory)
            assert all(hits == total != "0" for hits, total in from_memory), (node.name, from_memory)
    # each SuperNode is Flower's, started through fedslide's short-polling launcher (its log lines carry times)
    # (by each SuperNode's own pid: a child it forks shows the same command line until it execs, and the
    # tracker may catch one in that moment)
    supernode_pids = {n.process.proc.pid for n in consortium.nodes if n.process is not None}
    assert len(supernode_pids) == len(consortium.nodes)
    for (pid, _), command in tracker.cmdlines.items():
        if pid in supernode_pids:
            assert "-m fedslide.client.supernode" in command, command
    assert supernode_pids <= {pid for pid, _ in tracker.cmdlines}
    assert not [c for c in tracker.commands() if "flower-supernode" in c]
    for node in consortium.nodes[:3]:
        assert node.process is not None
        assert re.search(
            r"^INFO \d{4}-\d\d-\d\d [\d:,]+:\s+Received successfully", node.process.log.read_text(), re.M
        ), node.name

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(s["name"] for s in metrics["sites"]) == ["site1", "site2", "site3"]
    assert len(metrics["refused"]) == 1 and metrics["refused"][0]["site"] == "site4"
    assert f"encoder-hash {OTHER_HASH!r}" in metrics["refused"][0]["reason"]
    assert metrics["missing"] == []
    assert metrics["models"]["student_low"]["overall"]["n"] == 12

    secret = slide_ids(sites)
    for site in sites[:3]:
        entries = ledger(site, "tls")
        assert {e["phase"] for e in entries} == ALL_PHASES, site.name
        raw = (site / "runs" / "tls" / "egress.jsonl").read_text()
        assert not [sid for sid in secret if sid in raw], site.name
        bundle = site / "runs" / "tls" / "student_bundle"
        assert (bundle / "bundle.json").is_file(), site.name
    refused = ledger(sites[3], "tls")
    assert {e["phase"] for e in refused} == {"handshake"}  # it took no further part
    assert not [sid for sid in secret if sid in (sites[3] / "runs" / "tls" / "egress.jsonl").read_text()]

    logs = run_dir / "logs"
    assert "superlink.log" in {p.name for p in logs.iterdir()}
    assert {f"supernode-{s.name}.log" for s in sites} <= {p.name for p in logs.iterdir()}
    serverapp = (logs / "serverapp.log").read_text()
    assert "handshake: refused site site4" in serverapp, serverapp[-2000:]
    # the ServerApp's log streamed to the launcher while the run went on, through the last phase (the stream's end
    # told the launcher the run was over); that stream is the log kept, not one fetched afterwards (`--show`)
    assert "'phase': student" in serverapp and "Starting logstream" in serverapp, serverapp[-2000:]
    assert serverapp == (tmp_path / "work" / f"serverapp-{consortium.run_id}.log").read_text()


def test_an_app_flower_refuses_exits_1_with_its_reason(
    sites: list[Path],
    tmp_path: Path,
    tracker: ProcessTracker,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `flwr run` refuses an app whose manifest lacks [tool.flwr.app] (what an installed fedslide handed it until
    # now): `fedslide federate` exits 1 with Flower's reason instead of a traceback, and stops what it started
    app = tmp_path / "app-source"
    for package in ("server", "client", "common", "deploy"):
        shutil.copytree(REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "pyproject.toml").write_text('[project]\nname = "fedslide"\nversion = "0.1.0"\n')
    monkeypatch.setattr("fedslide.deploy.federate.APP_DIR", app)
    tracker.follow_children()
    launch = SuperNode.launch

    def launch_tracked(node: SuperNode) -> None:
        launch(node)
        tracker.add(node)  # its process group too: the SuperExec it starts

    monkeypatch.setattr(SuperNode, "launch", launch_tracked)
    code = main(["federate", "--sites", *map(str, sites[:3]), "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert out.startswith("fedslide federate: FAILED\n`flwr run ") and "Missing [tool.flwr.app] section" in out, out
    assert any("flower-superlink" in c for c in tracker.commands()), tracker.commands()  # it had started them
    assert sum("-m fedslide.client.supernode" in c for c in tracker.commands()) == 3, tracker.commands()
    assert wait_until(lambda: not tracker.alive(), 10, poll=0.5), tracker.alive()


# ---------------------------------------------------------------------------------------------
# 2. identity: certificates and registered keys
# ---------------------------------------------------------------------------------------------
def node_statuses(cli: FlowerCli) -> dict[str, str]:
    """node id -> status (registered / online / offline ...) as `flwr supernode ls` reports it."""
    return {
        str(n["node-id"]): str(n["status"])
        for n in cli.call("supernode", "ls", cli.connection, "--format", "json", timeout=60)["nodes"]
    }


def online_in_db(database: Path) -> list[int]:
    """Node ids the SuperLink's own database marks online (read-only; works when no client can connect)."""
    if not database.is_file():
        return []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
        return [int(r[0]) & 0xFFFFFFFFFFFFFFFF for r in db.execute("SELECT node_id FROM node WHERE status = 'online'")]


def log_text(node: SuperNode) -> str:
    assert node.process is not None
    return node.process.log.read_text(errors="replace") if node.process.log.is_file() else ""


def start_node(tracker: ProcessTracker, node: SuperNode, may_fail: bool = False) -> SuperNode:
    """Start a SuperNode under the tracker (it is stopped at teardown whatever happens). With `may_fail`, a
    SuperNode that gives up before its local port is up (refused by the SuperLink) is returned as it is."""
    tracker.add(node)
    try:
        node.start(timeout=30)
    except ProcessFailed:
        if not may_fail:
            raise
    tracker.snapshot()
    return node


def test_identity_is_enforced(sites: list[Path], tmp_path: Path, tracker: ProcessTracker) -> None:
    certs = tmp_path / "certs"
    material = make_all(certs, ["siteA", "siteB"], ["localhost"], ["127.0.0.1"])
    stranger = make_ca(tmp_path / "other-ca")  # a CA the SuperLink's certificate was not issued by
    tls = TLSFiles(ca=material.ca.cert, cert=material.server.cert, key=material.server.key)
    link = tracker.add(SuperLink(tmp_path / "link", tls, port=free_port(), node_auth=True))
    link.start(timeout=30)
    tracker.add(link)
    cli = FlowerCli(tmp_path / "flwr-home", link.address, material.ca.cert)
    node_a = cli.register(material.sites["siteA"].cert)  # site B's key is never registered
    assert node_statuses(cli) == {node_a: "registered"}

    def supernode(name: str, ca: Path, key: Path) -> SuperNode:
        return SuperNode(name, sites[0], link.address, free_port(), tmp_path / "nodes", ca, key)

    # (a) site A's registered key, but it trusts another CA; (b) the right CA, but site B's unregistered key
    wrong_ca = start_node(tracker, supernode("wrong-ca", stranger.cert, material.sites["siteA"].key), True)
    unregistered = start_node(tracker, supernode("unregistered", material.ca.cert, material.sites["siteB"].key), True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        statuses = node_statuses(cli)
        assert "online" not in statuses.values(), statuses
        time.sleep(2)
    assert node_statuses(cli) == {node_a: "registered"}  # site B never became a node either
    text_a = log_text(wrong_ca)
    assert "certificate verify failed" in text_a.lower(), text_a[-3000:]
    text_b = log_text(unregistered)
    assert "certificate verify failed" not in text_b.lower(), text_b[-3000:]  # TLS was fine: the key was refused
    assert any(
        word in text_b.lower()
        for word in (
            "failed to activate",
            "permission denied",
            "not registered",
            "unauthenticated",
            "no supernode found",
        )
    ), text_b[-3000:]
    wrong_ca.stop()
    unregistered.stop()

    # (c) the registered key with the right CA comes online: the checks above could have seen it
    good = start_node(tracker, supernode("siteA", material.ca.cert, material.sites["siteA"].key))
    assert wait_until(lambda: node_statuses(cli).get(node_a) == "online", 30, poll=2), (
        f"{node_statuses(cli)}\n{log_text(good)[-3000:]}"
    )
    assert online_in_db(link.workdir / "state.db") == [int(node_a)]  # the observation used for (d) sees it too
    good.stop()
    link.stop()

    # (d) a SuperLink presenting an expired certificate (same CA): nobody connects to it. Without node auth,
    # so that the certificate is the only obstacle a SuperNode meets.
    expired_dir = tmp_path / "expired"
    now = dt.datetime.now(dt.timezone.utc)
    expired = make_server_cert(
        expired_dir,
        material.ca,
        ["localhost"],
        ["127.0.0.1"],
        not_valid_before=now - dt.timedelta(days=30),
        not_valid_after=now - dt.timedelta(days=1),
    )
    old_link = tracker.add(
        SuperLink(
            tmp_path / "old-link",
            TLSFiles(material.ca.cert, expired.cert, expired.key),
            port=free_port(),
            node_auth=False,
        )
    )
    old_link.start(timeout=30)
    tracker.add(old_link)
    late = start_node(
        tracker,
        SuperNode(
            "late",
            sites[0],
            old_link.address,
            free_port(),
            tmp_path / "nodes",
            material.ca.cert,
            material.sites["siteA"].key,
        ),
        True,
    )
    old_cli = FlowerCli(tmp_path / "flwr-home-old", old_link.address, material.ca.cert)
    with pytest.raises(FlowerCliError):  # the CLI refuses the expired certificate as well
        old_cli.call("supernode", "ls", old_cli.connection, "--format", "json", timeout=60)
    assert not wait_until(lambda: bool(online_in_db(old_link.workdir / "state.db")), 15, poll=1)
    assert "activated" not in old_link.process.log.read_text(errors="replace").lower()
    text = log_text(late)
    assert any(word in text.lower() for word in ("expired", "certificate", "ssl", "handshake failed")), text[-3000:]


# ---------------------------------------------------------------------------------------------
# 3. a SuperNode killed mid-round
# ---------------------------------------------------------------------------------------------
def test_a_node_killed_mid_round_is_recorded_and_the_round_completes(
    sites: list[Path], tmp_path: Path, tracker: ProcessTracker
) -> None:
    good = sites[:3]
    cfg = tiny_config("kill", rounds={"teacher": 3}, min_nodes=2, kd={"lambda_expert": 0.0}, round_timeout=300.0)
    events: dict[str, Any] = {}
    polls: list[str] = []

    def superexec_polls(node: SuperNode) -> list[str]:
        assert node.process is not None
        children = psutil.Process(node.process.proc.pid).children(recursive=True)
        return [c.environ().get(SUPEREXEC_POLL_ENV, "") for c in children if "superexec" in " ".join(c.cmdline())]

    def kill_and_restart(consortium: Consortium) -> None:
        victim = consortium.nodes[-1]
        # the adapter phase is done: the teacher's round 1 is being sent out now
        assert wait_until(lambda: "adapter" in read_state(consortium.run_dir).get("phases", {}), 600, poll=0.5), (
            "the adapter phase never finished"
        )
        victim.stop()
        events["killed"] = victim.name
        # once the SuperLink has noticed (heartbeat timeout), bring the site back with the same key
        assert wait_until(lambda: "offline" in node_statuses(consortium.cli).values(), 180, poll=5), node_statuses(
            consortium.cli
        )
        events["offline"] = [n for n, s in node_statuses(consortium.cli).items() if s == "offline"]
        # back as a hospital runs it: `fedslide-supernode` in Flower's subprocess isolation, which starts
        # fedslide's warm SuperExec itself (the site image's entrypoint)
        again = SuperNode(
            victim.name,
            victim.site_dir,
            victim.superlink,
            free_port(),
            victim.workdir / "again",
            victim.ca,
            victim.auth_key,
            isolation="subprocess",
        )
        events["restarted"] = again
        events["ledger-before"] = len(ledger(good[2], "kill"))
        start_node(tracker, again)

    threads: list[tuple[threading.Thread, list[BaseException]]] = []

    def submitted(consortium: Consortium) -> None:
        tracker.add_consortium(consortium)
        # Flower's own SuperExec (cold: one flwr-clientapp per message) polls for tasks at our interval
        for node in consortium.nodes:
            assert wait_until(lambda: superexec_polls(node), 30, poll=0.5), node.name
            polls.extend(superexec_polls(node))
        threads.append(in_thread(lambda: kill_and_restart(consortium)))

    run_dir = run_consortium(
        good, cfg, LaunchOptions(tmp_path / "work", timeout=RUN_TIMEOUT, on_submitted=submitted, warm=False)
    )
    thread, errors = threads[0]
    thread.join(5)
    assert not errors, errors
    assert events.get("killed") == "site3" and "restarted" in events
    assert polls == [str(SUPEREXEC_POLL_S)] * len(good), polls

    metrics = json.loads((run_dir / "metrics.json").read_text())
    node_of = {s["name"]: s["node"] for s in metrics["sites"]}
    assert set(node_of) == {"site1", "site2", "site3"}
    victim = node_of["site3"]
    assert [str(victim)] == events["offline"]  # the node the SuperLink saw go offline is site3's
    absent = [m for m in metrics["missing"] if victim in m["nodes"]]
    assert absent, metrics["missing"]
    assert all(m["nodes"] == [victim] for m in metrics["missing"]), metrics["missing"]  # no one else was missing
    first = absent[0]
    assert first["phase"] in ("adapter", "teacher"), first
    assert [h["round"] for h in metrics["learning_curves"]["teacher"]] == [0, 1, 2, 3]  # every round completed
    # the restarted site (same registered key, hence the same node id) took part again afterwards
    entries = ledger(good[2], "kill")
    later = {e["phase"] for e in entries} & {"kd-cache", "student", "evaluate"}
    assert later == {"kd-cache", "student", "evaluate"}, Counter(e["phase"] for e in entries)
    assert metrics["models"]["student_low"]["per_site"]["site3"]["n"] == 4
    # every message the restarted site answered ran in a child forked by the warm SuperExec its SuperNode started
    # (none in a cold flwr-clientapp), and the tasks after the first read the site's feature files from memory
    again = events["restarted"]
    assert again.superexec is None and again.process is not None
    log = again.process.log.read_text()
    assert "fedslide.client.superexec: preloaded" in log, log[-2000:]  # fedslide's SuperExec, not flower-superexec
    answered = len(entries) - events["ledger-before"]
    assert log.count("ClientApp in forked process") == answered >= 3, (answered, log[-2000:])
    from_memory = re.findall(r": (\d+) of (\d+) feature files from memory", log)
    assert from_memory and all(hits == total != "0" for hits, total in from_memory), from_memory
    events["restarted"].stop()  # started by the test, not by run_consortium
    assert wait_until(lambda: not tracker.alive(), 10, poll=0.5), tracker.alive()


# ---------------------------------------------------------------------------------------------
# 4. the SuperLink killed mid-phase, then resumed
# ---------------------------------------------------------------------------------------------
def test_resume_after_the_server_is_killed(sites: list[Path], tmp_path: Path, tracker: ProcessTracker) -> None:
    good = sites[:3]
    cfg = tiny_config("resume", rounds={"teacher": 3}, kd={"lambda_expert": 0.0}, round_timeout=300.0)
    work = tmp_path / "work"
    killed: dict[str, Any] = {}
    threads: list[tuple[threading.Thread, list[BaseException]]] = []

    def kill_link(consortium: Consortium) -> None:
        def current() -> dict[str, Any]:
            return read_state(consortium.run_dir).get("current") or {}

        assert wait_until(
            lambda: current().get("phase") == "teacher" and int(current().get("round", 0)) >= 1, 600, poll=0.5
        ), read_state(consortium.run_dir)
        killed["state"] = read_state(consortium.run_dir)
        os.killpg(consortium.link.process.proc.pid, signal.SIGKILL)  # the server host dies: no clean shutdown
        killed["done"] = True

    def submitted(consortium: Consortium) -> None:
        tracker.add_consortium(consortium)
        threads.append(in_thread(lambda: kill_link(consortium)))

    with pytest.raises((FederationFailed, ProcessFailed)):
        run_consortium(good, cfg, LaunchOptions(work, timeout=RUN_TIMEOUT, on_submitted=submitted))
    threads[0][0].join(5)
    assert not threads[0][1], threads[0][1]
    assert killed.get("done")
    run_dir = work / "runs" / "resume"
    state = read_state(run_dir)
    assert "teacher" not in state.get("phases", {}) and "adapter" in state["phases"]
    assert not (run_dir / "metrics.json").exists()
    assert wait_until(lambda: not tracker.alive(), 10, poll=0.5), tracker.alive()  # nothing of the first try left

    resumed = run_consortium(
        good,
        cfg.model_copy(update={"resume": True}),
        LaunchOptions(work, timeout=RUN_TIMEOUT, on_submitted=tracker.add_consortium),
    )
    assert resumed == run_dir
    state = read_state(run_dir)
    assert {"adapter", "teacher", "kd-cache", "student"} <= set(state["phases"]), state.get("phases")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(s["name"] for s in metrics["sites"]) == ["site1", "site2", "site3"]
    # the same sites, matched by name under the node ids the new SuperLink gave them
    before = {s["name"]: int(node) for node, s in killed["state"]["handshake"]["sites"].items()}
    after = {s["name"]: int(s["node"]) for s in metrics["sites"]}
    assert before.keys() == after.keys() and not set(before.values()) & set(after.values()), (before, after)
    assert [h["round"] for h in metrics["learning_curves"]["teacher"]][-1] == 3
    for site in good:
        entries = ledger(site, "resume")
        phases = Counter(e["phase"] for e in entries)
        assert phases["adapter"] == cfg.rounds.adapter + 1, (site.name, phases)  # rounds + one validation
        # the teacher's round 1 was checkpointed before the kill: the resumed run went on from there
        teacher_rounds = Counter(e["round"] for e in entries if e["phase"] == "teacher")
        assert teacher_rounds[1] == 1 and teacher_rounds[3] == 2, (site.name, teacher_rounds)  # round 3 + validation
        # the resumed run's SuperLink is a new one (in memory): the sites came back under new node ids, and the
        # ServerApp asked those nodes once who they are instead of admitting anyone anew
        assert phases["handshake"] == 2, (site.name, phases)
        assert phases["evaluate"] == 1 and phases["student"] == cfg.rounds.student + 1, (site.name, phases)
