"""Only the site's installed code runs at a site: a coordinator's modified app bundle (FAB), with REAL Flower
processes on loopback (SuperLink, SuperNodes and their warm SuperExecs, TLS and node authentication, as
`fedslide federate` starts them).

The coordinator submits a FAB whose ClientApp skips the egress check and adds a feature array to every reply. Each
site's SuperExec refuses it before any of the FAB's code runs: the refusal is in the site's SuperExec log and its
egress ledger, the coordinator is told why (error code and fixed text), and nothing of the array leaves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedslide.common.config.federation import FederationConfig
from fedslide.common.egress import ErrorCode
from fedslide.common.flower_app import REFUSALS, stage_app
from fedslide.deploy import federate
from fedslide.deploy.federate import Consortium, FederationFailed, LaunchOptions, run_consortium
from tests.feature_sites import make_site

pytestmark = pytest.mark.slow  # real SuperLink/SuperNode processes

EGRESS_CHECK = (
    "    check_reply(content, allowed)\n"  # in client/client_app.py's `_send`, which every reply goes through
)
LEAK = (
    '    content["leak"] = ArrayRecord({"features": Array(np.full((64, 384), 0.8125, dtype=np.float32))})\n'
    "    # the egress check is gone: the feature array leaves with every reply\n"
)


def stage_modified_app(app_dir: Path, stage: Path) -> Path:
    """What the coordinator submits: fedslide's app (same version) with the ClientApp's egress check replaced by a
    feature array added to every reply."""
    staged = stage_app(app_dir, stage)
    client_app = staged / "fedslide" / "client" / "client_app.py"
    text = client_app.read_text()
    assert text.count(EGRESS_CHECK) == 1, "client_app.py's `_send` changed: update EGRESS_CHECK"
    modified = text.replace(EGRESS_CHECK, LEAK)
    compile(modified, str(client_app), "exec")  # a working module, not a broken one that fails on import
    client_app.write_text(modified)
    return staged


def test_a_fab_whose_clientapp_skips_the_egress_check_is_refused_and_nothing_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sites = [make_site(tmp_path / "sites", f"site{i}", {"train": 4, "val": 2, "test": 2}, seed=i) for i in (1, 2)]
    cfg = FederationConfig(run_id="modified-fab", seed=0, threads=1)
    monkeypatch.setattr(federate, "stage_app", stage_modified_app)
    seen: list[Consortium] = []
    work = tmp_path / "work"
    with pytest.raises(FederationFailed) as failed:
        run_consortium(sites, cfg, LaunchOptions(work, timeout=300, poll=5, on_submitted=seen.append))

    # the coordinator was told why: every site answered the handshake with the code and its fixed text
    reason = f"{int(ErrorCode.CODE_REFUSED)} code-refused"
    assert "handshake: no site answered" in str(failed.value) and reason in str(failed.value), str(failed.value)
    serverapp = "\n".join(p.read_text() for p in work.glob("serverapp-*.log"))
    assert serverapp.count(REFUSALS["code-differs"]) >= len(sites), serverapp[-3000:]
    assert "leak" not in serverapp

    # every process of the federation is gone
    assert len(seen) == 1
    for managed in [seen[0].link.process, *(p for n in seen[0].nodes for p in n.processes)]:
        assert managed is not None and not managed.alive, managed.name

    for node, site in zip(seen[0].nodes, sites):
        assert node.superexec is not None, node.name
        superexec_log = node.superexec.log.read_text()
        # the site's log: the installed ClientApp's process refused the FAB, naming the modified file
        assert "the installed ClientApp in forked process" in superexec_log, superexec_log[-3000:]
        assert "REFUSED the" in superexec_log and "fedslide/client/client_app.py" in superexec_log, site.name
        assert "the FAB's ClientApp" not in superexec_log and "imported the app of FAB" not in superexec_log
        # the site's ledger: the refusals it sent, and nothing else left
        entries: list[dict[str, Any]] = [
            json.loads(line)
            for line in (site / "runs" / cfg.run_id / "egress.jsonl").read_text().splitlines()
            if line.strip()
        ]
        assert entries, site.name
        for entry in entries:
            assert entry["error"]["code"] == int(ErrorCode.CODE_REFUSED), entry
            assert entry["arrays"] == [] and entry["metrics"] == [], entry
        assert not (site / "runs" / cfg.run_id / "student_bundle").exists()
