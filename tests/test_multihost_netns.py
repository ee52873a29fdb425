"""Multi-host federation without Docker: the coordinating site and three hospitals, each in its own Linux network
namespace, on one virtual Ethernet segment (tests/netns.py: a bridge, one veth per host).

    srv  127.77.0.1   flower-superlink on 127.0.0.1:9093 (TLS, SuperNode auth; loopback of srv only)
                      nginx Fleet proxy on 127.77.0.1:9092 (deploy/fleet-proxy.conf, upstream and paths adapted)
    h1   127.77.0.11  fedslide-supernode site1 --superlink 127.77.0.1:9092 (own key, own FLWR_HOME; as the site
                      image runs it: Flower's SuperNode, which starts fedslide's warm SuperExec on the same host)
    h2   127.77.0.12  fedslide-supernode site2 ...
    h3   127.77.0.13  fedslide-supernode site3 ...

Addresses are loopback-range (127.77.0.0/24; `route_localnet` is switched on inside the namespaces only, and each
namespace's `lo` keeps only 127.0.0.1/32). Where the kernel does not route 127/8 between namespaces, tests/netns.py
falls back to 10.77.0.0/24 (the tests say which one ran). Ports are the deployment's own (9092 proxy, 9093
SuperLink, 9094 SuperNode runtime API): every host is a fresh namespace, so nothing else holds them.

What is checked:
- each process runs on its host (a hospital's SuperExec too); a hospital reaches the proxy, but neither the
  SuperLink's port at the coordinating site's address nor anything on its own loopback;
- a tiny run submitted at the coordinating site over 127.0.0.1 (the operators' path) completes with all three
  sites, every message a hospital answered ran in a child forked by its warm SuperExec, and the hospitals'
  Fleet traffic went through the proxy from their own addresses;
- a run submitted from a hospital (the `flwr` CLI with the federation's CA, pointed at the only address it can
  reach: the proxy) is refused with 403, as are node registration and the Control API over raw HTTPS, and the
  SuperLink lists no new run.

Skipped, with the reason, where network namespaces cannot be made (not root / no CAP_NET_ADMIN / no iproute2);
the refusal checks are skipped where nginx is not installed (the hospitals then dial the SuperLink directly).
Every process started here runs inside a lab namespace and is killed at teardown, and the namespaces (with their
veths and bridge) are deleted, also when a test fails. About 2-4 minutes, most of it the federated run.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedslide.client.supernode import SuperNode
from fedslide.common.config.federation import FederationConfig
from fedslide.common.flower_app import APP_DIR, stage_app, write_run_config
from fedslide.common.processes import ManagedProcess, port_open, tail
from fedslide.deploy.certs import Material, make_all, make_site_keys
from fedslide.server.superlink import FlowerCli, FlowerCliError, SuperLink, TLSFiles
from tests.feature_sites import make_site
from tests.netns import NetnsLab, probe_netns_support

pytestmark = pytest.mark.slow  # network namespaces and real Flower processes
REPO = Path(__file__).resolve().parents[1]
PREFIX = f"fs{os.getpid()}"
HOSTS = {"srv": 1, "h1": 11, "h2": 12, "h3": 13}
HOSPITALS = {"h1": "site1", "h2": "site2", "h3": "site3"}
PROXY_PORT, LINK_PORT, NODE_PORT, PROXY_HEALTH_PORT = 9092, 9093, 9094, 8081
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
RUN_ID = "netns"
RUN_TIMEOUT = 900.0  # a hung run fails the test instead of hanging it (~2 min on an idle 2-core host)


# ---------------------------------------------------------------------------------------------
# the Fleet proxy: deploy/fleet-proxy.conf with this lab's upstream, listen address and certificate paths
# ---------------------------------------------------------------------------------------------
def proxy_config(template: str, listen: str, upstream: str, certs: Path, health: str) -> str:
    """The product's proxy config with its deployment-specific values replaced (each exactly once, so a changed
    template fails here instead of silently testing something else)."""
    replacements = [
        (r"server superlink:9093;", f"server {upstream};"),
        (r"listen 9092 ssl;", f"listen {listen} ssl;"),
        (r"listen 127.0.0.1:8081;", f"listen {health};"),
    ]
    text = template
    for old, new in replacements:
        if text.count(old) != 1:
            raise AssertionError(f"deploy/fleet-proxy.conf: expected {old!r} exactly once")
        text = text.replace(old, new)
    text = re.sub(r"(?<=\s)/certs/", f"{certs}/", text)
    assert "/certs/" not in text.replace(f"{certs}/", "")
    return text


def nginx_main_config(workdir: Path, site_conf: Path) -> str:
    """A minimal nginx.conf around the proxy's server blocks (the official image includes conf.d/*.conf in http)."""
    tmp = workdir / "tmp"
    return f"""daemon off;
master_process on;
worker_processes 1;
user root;
pid {workdir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {site_conf};
}}
"""


# ---------------------------------------------------------------------------------------------
# the deployment
# ---------------------------------------------------------------------------------------------
@dataclass
class Deployment:
    lab: NetnsLab
    work: Path
    material: Material
    sites: dict[str, Path]  # hospital host -> its site directory
    link: SuperLink
    cli: FlowerCli  # at the coordinating site, over 127.0.0.1 (the allowed path)
    proxy: ManagedProcess | None
    fleet_address: str  # what the hospitals dial
    nodes: dict[str, SuperNode] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)  # site name -> Flower node id

    @property
    def srv_ip(self) -> str:
        return self.lab.ip("srv")

    def at_srv(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.lab.call("srv", fn, *args, **kwargs)

    def run_ids(self) -> set[int]:
        data = self.at_srv(self.cli.call, "ls", self.cli.connection, "--format", "json", timeout=60)
        return {int(r["run-id"]) for r in data["runs"]}

    def node_statuses(self) -> dict[str, str]:
        data = self.at_srv(self.cli.call, "supernode", "ls", self.cli.connection, "--format", "json", timeout=60)
        return {str(n["node-id"]): str(n["status"]) for n in data["nodes"]}

    def logs(self) -> str:
        """Tails of every log, for failure messages."""
        parts = [f"--- {self.link.process.log}\n{tail(self.link.process.log, 15)}"] if self.link.process else []
        if self.proxy is not None:
            parts.append(f"--- {self.proxy.log}\n{tail(self.proxy.log, 10)}")
        for node in self.nodes.values():
            if node.process is not None:
                parts.append(f"--- {node.process.log}\n{tail(node.process.log, 15)}")
        return "\n".join(parts)


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return condition()


@pytest.fixture(scope="module")
def lab() -> Iterator[NetnsLab]:
    reason = probe_netns_support(f"{PREFIX}-probe")
    if reason is not None:
        pytest.skip(f"multi-host test needs Linux network namespaces: {reason}")
    lab = NetnsLab(PREFIX, list(HOSTS), HOSTS).open()
    try:
        yield lab
    finally:
        lab.close()
        left = lab.leftovers()
        assert not left, f"network namespaces left behind: {left}"


@pytest.fixture(scope="module")
def deployment(lab: NetnsLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("netns")
    data = work / "data"
    sites = {
        host: make_site(data / host, name, {"train": 8, "val": 4, "test": 4}, seed=i)
        for i, (host, name) in enumerate(HOSPITALS.items(), start=1)
    }
    srv_ip = lab.ip("srv")
    # the proxy verifies the SuperLink as "superlink" (fleet-proxy.conf); hospitals check the proxy's srv_ip
    material = make_all(work / "srv" / "certs", list(HOSPITALS.values()), ["superlink"], [srv_ip])
    tls = TLSFiles(ca=material.ca.cert, cert=material.server.cert, key=material.server.key)
    nginx = shutil.which("nginx")
    # without the proxy the hospitals can only be served by a SuperLink listening on the segment itself
    link_host = "127.0.0.1" if nginx else "0.0.0.0"
    link = SuperLink(
        work / "srv" / "superlink",
        tls,
        host=link_host,
        port=LINK_PORT,
        node_auth=True,
        env={**os.environ, "FLWR_HOME": str(work / "srv" / "flwr-home")},
    )
    cli = FlowerCli(work / "srv" / "flwr-cli", f"127.0.0.1:{LINK_PORT}", material.ca.cert)
    dep = Deployment(
        lab, work, material, sites, link, cli, None, f"{srv_ip}:{PROXY_PORT}" if nginx else f"{srv_ip}:{LINK_PORT}"
    )
    try:
        lab.call("srv", link.start, timeout=60)
        node_ids = {name: lab.call("srv", cli.register, material.sites[name].cert) for name in HOSPITALS.values()}
        dep.node_ids = node_ids
        if nginx:
            pdir = work / "srv" / "proxy"
            (pdir / "tmp").mkdir(parents=True)
            site_conf = pdir / "fleet-proxy.conf"
            site_conf.write_text(
                proxy_config(
                    (REPO / "deploy" / "fleet-proxy.conf").read_text(),
                    f"{srv_ip}:{PROXY_PORT}",
                    f"127.0.0.1:{LINK_PORT}",
                    material.ca.cert.parent,
                    f"127.0.0.1:{PROXY_HEALTH_PORT}",
                )
            )
            (pdir / "nginx.conf").write_text(nginx_main_config(pdir, site_conf))

            def start_proxy() -> ManagedProcess:
                proc = ManagedProcess(
                    "Fleet proxy",
                    [nginx, "-p", str(pdir), "-c", str(pdir / "nginx.conf"), "-e", str(pdir / "error.log")],
                    pdir / "nginx.log",
                )
                proc.wait_ready(lambda: port_open(srv_ip, PROXY_PORT), 30)
                return proc

            dep.proxy = lab.call("srv", start_proxy)
        for host, site in sites.items():
            name = HOSPITALS[host]
            node = SuperNode(
                name,
                site,
                dep.fleet_address,
                NODE_PORT,
                work / host / "supernode",
                material.ca.cert,
                material.sites[name].key,
                env={**os.environ, "FLWR_HOME": str(work / host / "flwr-home")},
                isolation="subprocess",
            )
            dep.nodes[host] = node
            lab.call(host, node.start, timeout=60)
        assert wait_until(lambda: set(dep.node_statuses().values()) == {"online"}, 90, poll=3), (
            f"{dep.node_statuses()}\n{dep.logs()}"
        )
        yield dep
    finally:
        for node in dep.nodes.values():
            node.stop()
        if dep.proxy is not None:
            dep.proxy.stop()
        link.stop()
        lab.kill_all()  # whatever those started (SuperExec, ServerApp, ClientApps) and survived them


# ---------------------------------------------------------------------------------------------
# 1. the network: who runs where, who reaches what
# ---------------------------------------------------------------------------------------------
def test_each_host_in_its_own_namespace_and_hospitals_reach_only_the_proxy(deployment: Deployment) -> None:
    dep, lab = deployment, deployment.lab
    assert lab.subnet in ("127.77.0", "10.77.0"), lab.subnet
    assert lab.loopback_range or lab.notes, "fell back without saying why"
    inodes = {host: lab.inode(host) for host in HOSTS}
    assert len(set(inodes.values())) == len(HOSTS)
    assert lab.host_of_pid(os.getpid()) is None  # the test itself stays on the machine's own network
    assert lab.host_of_pid(dep.link.process.proc.pid) == "srv"
    for host, node in dep.nodes.items():
        assert lab.host_of_pid(node.process.proc.pid) == host, node.name
        superexecs = [
            c
            for c in psutil.Process(node.process.proc.pid).children(recursive=True)
            if "superexec" in " ".join(c.cmdline())
        ]
        assert len(superexecs) == 1 and "fedslide.client.superexec" in superexecs[0].cmdline(), (node.name, superexecs)
        assert lab.host_of_pid(superexecs[0].pid) == host, node.name
    assert set(dep.node_statuses()) == set(dep.node_ids.values())

    # the coordinating site reaches its SuperLink on loopback
    assert lab.port_open("srv", "127.0.0.1", LINK_PORT)
    for host in HOSPITALS:
        # a hospital's own 127.0.0.1 is its own loopback: the coordinating site's SuperLink is not there
        assert not lab.port_open(host, "127.0.0.1", LINK_PORT), host
        # the hospitals reach the coordinating site over the segment, each from its own address
        assert lab.call(host, lambda: _source_address(dep.srv_ip, int(dep.fleet_address.rsplit(":", 1)[1]))) == lab.ip(
            host
        )
        if dep.proxy is not None:
            assert lab.port_open(host, dep.srv_ip, PROXY_PORT), host
            # the SuperLink's own port is bound to srv's loopback: not reachable at srv's address
            assert not lab.port_open(host, dep.srv_ip, LINK_PORT), host
    if dep.proxy is not None:
        assert lab.host_of_pid(dep.proxy.proc.pid) == "srv"
        assert not lab.port_open("srv", dep.srv_ip, LINK_PORT)


def _source_address(address: str, port: int) -> str:
    import socket

    with socket.create_connection((address, port), timeout=5) as s:
        return str(s.getsockname()[0])


# ---------------------------------------------------------------------------------------------
# 2. a run from the coordinating site (the allowed path) completes with all three hospitals
# ---------------------------------------------------------------------------------------------
def test_run_submitted_at_the_coordinating_site_completes(deployment: Deployment) -> None:
    dep = deployment
    started = time.monotonic()
    runs_dir = dep.work / "srv" / "runs"
    cfg = FederationConfig(
        run_id=RUN_ID,
        runs_dir=runs_dir,
        seed=0,
        threads=1,
        rounds=ONE_ROUND,
        teacher=TINY_MODEL,
        student=TINY_MODEL,
        adapter={"hidden_dim": 16},
        clusters={"num_clusters": 2},
        training={"lr": 1e-2},
        kd={"lambda_expert": 0.0},
        expected_nodes=len(HOSPITALS),
        round_timeout=240.0,
    )
    config_file = dep.work / "srv" / f"run-config-{RUN_ID}.toml"
    write_run_config(config_file, cfg)
    before = dep.run_ids()
    run_id = dep.at_srv(dep.cli.submit, stage_app(APP_DIR, dep.work / "srv" / "app"), config_file)
    assert run_id not in before

    # cheap polling (each `flwr ls` is a Python start-up): the metrics file first, the run's status now and then
    run_dir = runs_dir / RUN_ID
    status: dict[str, Any] = {}
    deadline = time.monotonic() + RUN_TIMEOUT
    last_status = 0.0
    while time.monotonic() < deadline:
        assert dep.link.process.alive, dep.logs()
        for node in dep.nodes.values():
            assert node.process.alive, f"{node.name} died\n{dep.logs()}"
        if (run_dir / "metrics.json").is_file() or time.monotonic() - last_status > 30:
            status, last_status = dep.at_srv(dep.cli.status, run_id), time.monotonic()
            if str(status.get("status", "")).startswith("finished"):
                break
        time.sleep(2)
    state = f"{status.get('status')} {status.get('status-details', '')}"
    if "completed" not in state:
        pytest.fail(
            f"run ended as {state!r}; ServerApp log tail:\n{dep.at_srv(dep.cli.logs, run_id)[-3000:]}\n{dep.logs()}"
        )

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(s["name"] for s in metrics["sites"]) == sorted(HOSPITALS.values())  # in node-id order
    assert {str(s["node"]) for s in metrics["sites"]} == set(dep.node_ids.values())  # the registered keys
    assert metrics["missing"] == [] and metrics["refused"] == []
    assert metrics["models"]["student_low"]["overall"]["n"] == 12
    for host, site in dep.sites.items():
        ledger = (site / "runs" / RUN_ID / "egress.jsonl").read_text().splitlines()
        forked = dep.nodes[host].process.log.read_text().count("ClientApp in forked process")
        assert forked == len(ledger) > 0, (host, forked, len(ledger))  # every message in a warm child

    if dep.proxy is not None:  # every hospital's Fleet traffic came through the proxy, from its own address
        access = (dep.work / "srv" / "proxy" / "access.log").read_text()
        fleet_ok = {line.split()[0] for line in access.splitlines() if '"POST /v1/fleet/' in line and '" 200 ' in line}
        assert fleet_ok == {dep.lab.ip(h) for h in HOSPITALS}, fleet_ok
    print(f"\nrun over {dep.lab.subnet}.0/24 finished in {time.monotonic() - started:.0f} s")


# ---------------------------------------------------------------------------------------------
# 3. a run submitted from a hospital is refused
# ---------------------------------------------------------------------------------------------
def test_run_submitted_from_a_hospital_is_refused(deployment: Deployment, tmp_path: Path) -> None:
    dep, lab = deployment, deployment.lab
    if dep.proxy is None:
        pytest.skip(
            "nginx is not installed: without the Fleet proxy the hospitals reach the SuperLink's port "
            "directly, whose Control API open-source Flower does not authenticate"
        )
    before = dep.run_ids()
    fleet = dep.fleet_address
    # everything a hospital has: the federation's CA, and the one address it can reach
    rogue = FlowerCli(tmp_path / "h1-flwr-home", fleet, dep.material.ca.cert)
    config_file = tmp_path / "run-config.toml"
    write_run_config(
        config_file,
        FederationConfig(run_id="rogue", runs_dir=tmp_path / "runs", teacher=TINY_MODEL, student=TINY_MODEL),
    )

    with pytest.raises(FlowerCliError) as refused:
        lab.call(
            "h1",
            rogue.call,
            "run",
            str(stage_app(APP_DIR, tmp_path / "app")),
            rogue.connection,
            "--run-config",
            str(config_file),
            "--format",
            "json",
            timeout=120,
        )
    assert "403" in str(refused.value) or "forbidden" in str(refused.value).lower(), str(refused.value)
    print(f"\nflwr run from h1 via {fleet}: {' | '.join(str(refused.value).splitlines()[:6])}")

    # nor can a hospital register a node of its own, or use the Control / Runtime API over raw HTTPS
    extra = make_site_keys(tmp_path / "keys", ["rogue"])["rogue"]
    with pytest.raises(FlowerCliError):
        lab.call(
            "h1", rogue.call, "supernode", "register", str(extra.cert), rogue.connection, "--format", "json", timeout=60
        )
    host, port = fleet.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(dep.material.ca.cert))

    def request(method: str, path: str) -> int:
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
        try:
            conn.request(
                method, path, body=b"" if method == "POST" else None, headers={"Content-Type": "application/protobuf"}
            )
            return conn.getresponse().status
        finally:
            conn.close()

    for method, path in [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/runtime/pull-app-inputs"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ]:
        assert lab.call("h1", request, method, path) == 403, (method, path)

    # the SuperLink saw no new run, and the refusals came from the hospital's address, answered by the proxy
    assert dep.run_ids() == before
    access = (dep.work / "srv" / "proxy" / "access.log").read_text().splitlines()
    refused_starts = [line for line in access if '"POST /v1/control/start-run' in line and '" 403 ' in line]
    assert refused_starts and all(line.split()[0] == lab.ip("h1") for line in refused_starts), refused_starts
    superlink_log = dep.link.process.log.read_text(errors="replace")
    assert "rogue" not in superlink_log
