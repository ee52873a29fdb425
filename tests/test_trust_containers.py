"""The containers a hospital and the coordinating site run: read-only root filesystems with tmpfs, root-owned Python
environments, memory and process limits, one pinned flwr (deploy/compose.yaml and deploy/*.Dockerfile)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PYPROJECT = DEPLOY.parent / "pyproject.toml"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]


def test_every_container_has_a_read_only_root_with_limits(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= {"superlink", "serverapp", "fleet-proxy", "site1", "site2", "site3"}
    for name, svc in services.items():
        assert svc.get("read_only") is True, f"{name}: writable root filesystem"
        assert "/tmp" in svc.get("tmpfs", []), f"{name}: no tmpfs for /tmp"
        assert isinstance(svc.get("pids_limit"), int) and 0 < svc["pids_limit"] <= 4096, f"{name}: pids_limit"
        assert re.fullmatch(r"(\$\{\w+:-)?\d+[mg]\}?", str(svc.get("mem_limit", ""))), f"{name}: mem_limit"
        assert "ALL" in svc.get("cap_drop", []) and "no-new-privileges:true" in svc.get("security_opt", [])


def test_flower_runtimes_get_a_tmpfs_for_their_app_state(services: dict[str, dict[str, Any]]) -> None:
    """The SuperNode and the ServerApp's SuperExec write Flower's home (installed app bundles) under /app/.flwr."""
    for name in ("serverapp", "site1", "site2", "site3"):
        assert "/app/.flwr" in services[name]["tmpfs"], name
    for name, svc in services.items():  # nothing but the declared mounts and tmpfs is writable
        for mount in svc.get("volumes", []):
            if not mount.get("read_only"):
                assert mount["target"] in ("/data/site/runs", "/data/runs", "/app/state"), (name, mount)


@pytest.mark.parametrize("name", ["site", "serverapp"])
def test_python_environment_is_installed_and_owned_by_root(name: str) -> None:
    """pip runs as root, the environment is chowned to root and made unwritable to others, and only then does the
    image switch to its runtime UID 49999; no COPY hands files to that UID."""
    text = re.sub(r"\\\n", " ", (DEPLOY / f"{name}.Dockerfile").read_text())
    steps = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    users = [(i, s.split()[1]) for i, s in enumerate(steps) if s.startswith("USER ")]
    install = next(i for i, s in enumerate(steps) if s.startswith("RUN pip install"))
    before = [u for i, u in users if i < install]
    assert before and before[-1] == "0", f"{name}: pip does not run as root"
    assert users[-1][1] == "49999" and users[-1][0] > install
    assert 'chown -R root:root "$(python -c' in steps[install] and "chmod -R go-w" in steps[install]
    assert not any("--chown=49999" in s for s in steps), f"{name}: files handed to the runtime UID"


def test_one_flwr_version_matches_pyproject() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    flwr = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "flwr")
    found = set()
    for dockerfile in DEPLOY.glob("*.Dockerfile"):
        found |= set(re.findall(r"flwr/\w+:(\d+\.\d+\.\d+)", dockerfile.read_text()))
        found |= set(re.findall(r'"flwr==(\d+\.\d+\.\d+)"', dockerfile.read_text()))
    assert found == {"1.42.0"}  # every image and every pip install: one release
    assert flwr.specifier.contains("1.42.0") and not flwr.specifier.contains("1.41.0")  # the one pyproject allows
