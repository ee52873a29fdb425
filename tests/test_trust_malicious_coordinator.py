"""A careless or compromised coordinator against the sites' installed code, with REAL Flower processes on loopback:
one SuperLink (TLS, SuperNode authentication) and two SuperNodes with their warm SuperExecs, shared by every case
of this module; each case is one `flwr run` of a hostile ServerApp (tests/trust_hostile_serverapp.py) in an
otherwise unmodified app bundle, so the sites accept the bundle and answer with their installed ClientApp.

Every site's node config sets the floors below (suppression 2, DP required, clipped and noised cluster statistics).
Each case asserts the site's refusal or clamp, that it is logged at the site and ledgered, that `fedslide audit`
verifies every ledger, and that nothing but the refusal (or the declared, checked reply) left the site.

Covered elsewhere: a modified FAB whose ClientApp skips the egress check (tests/test_trust_site_code.py, refused
with 106 `code-refused`); a `flwr run` of fedslide's own ServerApp below the suppression floor
(tests/test_trust_coordinator.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedslide.client.audit import audit
from fedslide.client.supernode import SuperNode
from fedslide.common.config.federation import FederationConfig
from fedslide.common.distillation.clustering import clip_rows
from fedslide.common.egress import ErrorCode, error_reason
from fedslide.common.flower_app import APP_DIR, app_manifest, stage_app, write_run_config
from fedslide.common.processes import free_port
from fedslide.deploy.certs import make_all
from fedslide.deploy.federate import stop_nodes
from fedslide.server.superlink import FlowerCli, SuperLink, TLSFiles
from tests.feature_sites import make_site

pytestmark = pytest.mark.slow  # real SuperLink/SuperNode processes

HOSTILE_APP = Path(__file__).with_name("trust_hostile_serverapp.py")
FLOORS = {"min-suppress-below": "2", "require-dp": "true", "cluster-noise-multiplier": "1.0"}
CLIP = 1.0
WITHIN_FLOORS: dict[str, Any] = {  # a run config the sites accept: DP on, clipped cluster statistics, noise 1 × clip
    "dp_noise_multiplier": 1.0,
    "cluster_clip_norm": CLIP,
    "cluster_noise_std": 1.0 * CLIP,
    "clusters": {"num_clusters": 2, "features": "embedding", "suppress_below": 2},
}
FORBIDDEN_RECORDS = ("features", "bags", "coords", "slide-ids", "leak")


@dataclass
class Federation:
    """The processes every case of this module shares."""

    root: Path
    sites: list[Path]
    cli: FlowerCli
    link: SuperLink
    nodes: list[SuperNode]

    def run(self, run_id: str, **config: Any) -> dict[str, Any]:
        """One `flwr run` of the hostile ServerApp under a run config of `config`; what its replies held."""
        cfg = FederationConfig(run_id=run_id, seed=0, threads=1, runs_dir=self.root / "runs", **config)
        config_file = self.root / f"run-config-{run_id}.toml"
        write_run_config(config_file, cfg)
        # staged for each run: the sites compare its client code with their installed files when each message comes
        flower_run = self.cli.submit(_stage_hostile_app(self.root / "app", self.sites), config_file)
        out = self.root / "runs" / f"hostile-{run_id}.json"
        deadline = time.monotonic() + 240
        status, asked = "", 0.0
        while time.monotonic() < deadline:  # the app writes `out` as it ends; `flwr ls` (a process) only now and then
            if out.is_file() or time.monotonic() - asked > 10:
                status, asked = str(self.cli.status(flower_run).get("status", "")), time.monotonic()
                if status.startswith("finished"):
                    break
            time.sleep(0.5)
        assert out.is_file(), f"run {run_id}: {status}\n{self.cli.logs(flower_run)[-4000:]}"
        assert "completed" in status, f"run {run_id}: {status}\n{self.cli.logs(flower_run)[-4000:]}"
        return dict(json.loads(out.read_text()))

    def superexec_logs(self) -> list[str]:
        return [node.superexec.log.read_text() for node in self.nodes if node.superexec is not None]


def _stage_hostile_app(stage: Path, sites: list[Path]) -> Path:
    """fedslide's app bundle with the hostile ServerApp as its server component (client and common untouched)."""
    staged = stage_app(APP_DIR, stage)
    shutil.copyfile(HOSTILE_APP, staged / "fedslide" / "server" / "hostile_app.py")
    plan = "\n".join([f"nodes = {len(sites)}", "[sites]", *(f'{s.name} = "{s}"' for s in sites)]) + "\n"
    (staged / "fedslide" / "server" / "hostile_plan.toml").write_text(plan)
    # the coordinator's own manifest: every run-config key of this FederationConfig at its default (the site reads
    # only its name, publisher, clientapp and version)
    text = app_manifest()
    manifest = staged / "pyproject.toml"
    component = '"fedslide.server.server_app:app"'
    assert text.count(component) == 1, "the app manifest's serverapp component changed: update this test"
    manifest.write_text(text.replace(component, '"fedslide.server.hostile_app:app"'))
    return staged


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("hostile")
    sites = [make_site(root / "sites", f"site{i}", {"train": 6, "val": 2, "test": 2}, seed=i) for i in (1, 2)]
    certs = root / "certs"
    material = make_all(certs, [s.name for s in sites], ["localhost"], ["127.0.0.1"])
    tls = TLSFiles(ca=material.ca.cert, cert=certs / "server.pem", key=certs / "server.key")
    link = SuperLink(root / "superlink", tls, port=free_port(), node_auth=True, in_memory=True)
    cli = FlowerCli(root / "flwr-home", link.address, tls.ca)
    with ExitStack() as stack:
        link.start()
        stack.callback(link.stop)
        for site in sites:
            cli.register(certs / f"{site.name}.pub")
        nodes = [
            SuperNode(
                site.name,
                site,
                link.address,
                free_port(),
                root / "supernodes",
                tls.ca,
                certs / f"{site.name}.key",
                node_options=FLOORS,
            )
            for site in sites
        ]
        stack.callback(stop_nodes, nodes)
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
        yield Federation(root, sites, cli, link, nodes)


@pytest.fixture(scope="module")
def probe(federation: Federation) -> dict[str, Any]:
    """The run within the sites' floors: escaping run ids, undeclared requests, cluster differencing."""
    return federation.run("probe", **WITHIN_FLOORS)


def _ledger(site: Path, run_id: str) -> list[dict[str, Any]]:
    path = site / "runs" / run_id / "egress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _audited(site: Path) -> None:
    """`fedslide audit SITE_DIR`'s check: every ledger under the site's runs/ verifies."""
    lines, breaks = audit(site / "runs")
    assert breaks == [], lines


def _nothing_forbidden(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        for array in entry["arrays"]:
            assert array["record"] not in FORBIDDEN_RECORDS and array["name"] not in FORBIDDEN_RECORDS, entry


def test_run_ids_that_escape_runs_are_refused_and_nothing_is_written(
    federation: Federation, probe: dict[str, Any]
) -> None:
    for step in ("escape-relative", "escape-absolute"):
        replies = probe[step]
        assert len(replies) == len(federation.sites), replies
        for reply in replies:
            assert reply["error"]["code"] == int(ErrorCode.SITE_CONFIG), reply  # a fixed text, no path
            assert "escaped" not in reply["error"]["reason"], reply
    assert not (federation.root / "escaped").exists()  # the absolute run id
    for site in federation.sites:
        assert not (site / "escaped").exists()  # `runs/../escaped`
        assert "escaped" not in {p.name for p in (site / "runs").iterdir()}, site
        _audited(site)
    for text in federation.superexec_logs():
        assert text.count("run id '../escaped' refused") >= 1, text[-3000:]
        assert "escaped' refused" in text


def test_requests_for_what_no_phase_declares_are_answered_with_the_declared_reply_or_refused(
    federation: Federation, probe: dict[str, Any]
) -> None:
    # extra config keys asking for features: the handshake's declared reply, nothing more
    for reply in probe["undeclared-keys"]:
        assert "error" not in reply, reply
        assert reply["arrays"] == {}, reply
        assert set(reply["configs"]) == {"site"} and set(reply["metrics"]) == {"metrics"}, reply
    # a phase named `features`: refused with a fixed text, ledgered as an error
    for reply in probe["undeclared-phase"]:
        assert reply["error"]["code"] == int(ErrorCode.INTERNAL), reply
        assert "features" not in reply["error"]["reason"], reply
    # a message type without a site step: Flower's routing refuses it before any site code runs, with Flower's
    # error 2 (CLIENT_APP_RAISED_EXCEPTION) and Flower's text naming only the coordinator's own message type; no
    # site code ran, so this reply is not in the site's ledger
    for reply in probe["undeclared-type"]:
        assert reply["error"]["code"] == 2, reply
        assert reply["error"]["reason"] == "<class 'ValueError'>:<'No query function registered with name 'features''>"
    # a request the site's step fails on: the code and its fixed text only, nothing of the site's exception (which
    # names the site's own folders)
    codes = []
    for reply in probe["error-text"]:
        code = ErrorCode(reply["error"]["code"])
        codes.append(int(code))
        assert reply["error"]["reason"] == error_reason(code), reply
        assert all(str(site) not in reply["error"]["reason"] for site in federation.sites), reply
        assert set(reply) == {"node", "error"}, reply
    assert len(codes) == len(federation.sites) and len(set(codes)) == 1, codes
    for site in federation.sites:
        entries = _ledger(site, "probe")
        _nothing_forbidden(entries)
        errors = [e for e in entries if e.get("error")]
        # the `features` phase, then the failed cluster-statistics request
        assert sorted(e["error"]["code"] for e in errors) == sorted([int(ErrorCode.INTERNAL), *codes[:1]]), errors
        assert all(str(site) not in json.dumps(e["error"]) for e in errors), errors
        handshakes = [e for e in entries if e["phase"] == "handshake" and not e.get("error")]
        assert len(handshakes) == 2 and all(e["arrays"] == [] for e in handshakes), handshakes
        _audited(site)


def test_cluster_differencing_by_an_omniscient_coordinator_does_not_give_back_the_slide(
    federation: Federation, probe: dict[str, Any]
) -> None:
    names = probe["names"]
    assert set(probe["targets"]) == {s.name for s in federation.sites}, probe["targets"]
    assert all("vector" in target for target in probe["targets"].values()), probe["targets"]
    first = {names[str(r["node"])]: r for r in probe["cluster-stats-1"]}
    second = {names[str(r["node"])]: r for r in probe["cluster-stats-2"]}
    for site in federation.sites:
        one, two = first[site.name]["arrays"]["stats"], second[site.name]["arrays"]["stats"]
        counts_one, counts_two = np.array(one["counts"]), np.array(two["counts"])
        assert counts_one[0] - counts_two[0] == 1, (counts_one, counts_two)  # one slide moved: the attack's setup
        assert counts_one[1] == 0 and counts_two[1] == 2, (counts_one, counts_two)  # a lone slide is withheld
        recovered = np.array(one["sums"][0]) - np.array(two["sums"][0])
        target = np.array(probe["targets"][site.name]["vector"])
        clipped = clip_rows(target[None], CLIP)[0]
        assert np.linalg.norm(target) > 2 * CLIP  # the clip binds: the exact vector cannot come back
        for truth in (target, clipped):
            error = np.linalg.norm(recovered - truth) / np.linalg.norm(truth)
            cosine = recovered @ truth / (np.linalg.norm(recovered) * np.linalg.norm(truth))
            assert error > 0.9 and cosine < 0.5, (site.name, error, cosine)
        entries = _ledger(site, "probe")
        stats = [e for e in entries if e["phase"] in ("cluster-init", "cluster-stats") and not e.get("error")]
        assert len(stats) == 3, [e["phase"] for e in entries]  # init and the two releases, each ledgered
        for entry in stats:
            assert {a["name"] for a in entry["arrays"]} == {"sums", "counts"}, entry
        _audited(site)


@pytest.mark.parametrize(
    ("run_id", "config", "codes"),
    [
        (  # DP off, and logits mode (un-noised logits) against a site that requires DP
            "logits-no-dp",
            {**WITHIN_FLOORS, "dp_noise_multiplier": 0.0, "mode": "logits", "proxy_dir": "proxy"},
            ["floor-require-dp", "floor-dp-logits"],
        ),
        (  # suppression below the site's floor of 2, cluster statistics neither clipped nor noised
            "suppress-1-unclipped",
            {
                **WITHIN_FLOORS,
                "clusters": {**WITHIN_FLOORS["clusters"], "suppress_below": 1},
                "cluster_clip_norm": None,
                "cluster_noise_std": 0.0,
            },
            ["floor-suppress-below", "floor-cluster-noise"],
        ),
    ],
)
def test_a_run_below_the_sites_floors_is_refused_at_the_handshake(
    federation: Federation, run_id: str, config: dict[str, Any], codes: list[str]
) -> None:
    if "proxy_dir" in config:
        (federation.root / "proxy").mkdir(exist_ok=True)
        config = {**config, "proxy_dir": federation.root / "proxy"}
    seen = federation.run(run_id, **config)
    assert list(seen) == ["handshake"], seen.keys()  # the coordinator got nothing to go on
    for reply in seen["handshake"]:
        assert reply["error"]["code"] == int(ErrorCode.PRIVACY_FLOOR), reply
        assert f"[{codes[0]}]" in reply["error"]["reason"], reply  # the first floor broken is the code
        for code in codes:  # every floor broken is named
            assert code in reply["error"]["reason"], reply
    for site in federation.sites:
        run_dir = site / "runs" / run_id
        assert sorted(p.name for p in run_dir.iterdir()) == ["egress.jsonl"], site.name  # nothing else written
        entries = _ledger(site, run_id)
        assert [e["phase"] for e in entries] == ["handshake"], entries  # only the refusal left
        assert entries[0]["error"]["code"] == int(ErrorCode.PRIVACY_FLOOR), entries
        assert entries[0]["arrays"] == [] and entries[0]["metrics"] == [], entries
        _audited(site)
    for text in federation.superexec_logs():
        assert codes[0] in text  # logged at the site


def test_fedslide_audit_verifies_every_ledger_the_hostile_runs_left(federation: Federation) -> None:
    for site in federation.sites:
        done = subprocess.run(
            [sys.executable, "-m", "fedslide.deploy.cli", "audit", str(site)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "CHAIN BROKEN" not in done.stdout and "chain verified" in done.stdout, done.stdout
