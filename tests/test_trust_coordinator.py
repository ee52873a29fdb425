"""A coordinator's run config below the hospitals' privacy floors, with REAL Flower processes on loopback (SuperLink,
SuperNodes and their warm SuperExecs, TLS and node authentication, as `fedslide federate` starts them).

Each site's node config sets a suppression floor of 5; the coordinator submits `suppress-below = 0`. Every site
refuses at the handshake, before it reads any data: the coordinator is told the code and the floor, the site's
ledger holds only the refusal, and the site wrote no run outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedslide.common.config.federation import FederationConfig
from fedslide.common.egress import ErrorCode
from fedslide.deploy.federate import Consortium, FederationFailed, LaunchOptions, run_consortium
from tests.feature_sites import make_site

pytestmark = pytest.mark.slow  # real SuperLink/SuperNode processes


def test_a_run_below_the_sites_suppression_floor_is_refused_at_the_handshake(tmp_path: Path) -> None:
    sites = [make_site(tmp_path / "sites", f"site{i}", {"train": 4, "val": 2, "test": 2}, seed=i) for i in (1, 2)]
    cfg = FederationConfig(run_id="below-floor", seed=0, threads=1, suppress_below=0)
    seen: list[Consortium] = []
    opts = LaunchOptions(
        tmp_path / "work", timeout=300, poll=5, on_submitted=seen.append, node_options={"min-suppress-below": "5"}
    )
    with pytest.raises(FederationFailed) as failed:
        run_consortium(sites, cfg, opts)

    # the coordinator was told why, with the site's code and the floor it broke
    message = str(failed.value)
    assert "handshake: no site answered" in message, message
    assert f"{int(ErrorCode.PRIVACY_FLOOR)}" in message and "floor-suppress-below" in message, message
    assert "suppress-below = 0 is below this site's floor of 5" in message, message

    assert len(seen) == 1
    for managed in [seen[0].link.process, *(p for n in seen[0].nodes for p in n.processes)]:
        assert managed is not None and not managed.alive, managed.name

    for node, site in zip(seen[0].nodes, sites):
        assert node.superexec is not None, node.name
        assert "floor-suppress-below" in node.superexec.log.read_text(), site.name  # logged at the site
        run_dir = site / "runs" / cfg.run_id
        entries: list[dict[str, Any]] = [
            json.loads(line) for line in (run_dir / "egress.jsonl").read_text().splitlines() if line.strip()
        ]
        assert entries, site.name
        for entry in entries:  # only the refusal left
            assert entry["error"]["code"] == int(ErrorCode.PRIVACY_FLOOR), entry
            assert entry["arrays"] == [] and entry["metrics"] == [], entry
        assert sorted(p.name for p in run_dir.iterdir()) == ["egress.jsonl"], site.name  # nothing else written
