"""`fedslide deploy`: container specs for the coordinating site and hospital sites, and a Docker launcher.

`build_plan(cfg)` is a pure function from a `DeployConfig` to a `DeploymentPlan` (networks, volumes and one
`ContainerSpec` per container: image, command, mounts with ro/rw modes, published ports, environment, user,
health check, networks). `launch(plan)` creates and starts them with the Docker SDK. The layout matches
deploy/compose.yaml; deploy/README.md explains it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedslide.common.cli_support import EXIT_ERROR, EXIT_OK, EXIT_USAGE, ConfigError, add_config_arguments
from fedslide.common.flower_env import QUIET_FLOWER
from fedslide.deploy.config import FLEET_PROXY_HOST, DeployConfig, SiteConfig, load_deploy_config

SUPERLINK_PORT = 9093  # the SuperLink's port inside the compose/SDK networks (Fleet, Control, Runtime APIs)
FLEET_PORT = 9092  # the Fleet proxy's port inside the networks (deploy/fleet-proxy.conf)
APP_UID = "49999"  # the unprivileged `app` user of Flower's images
NGINX_UID = "101"  # the unprivileged `nginx` user of nginx-unprivileged
SUPEREXEC_HEALTH = "127.0.0.1:9095"
SUPERNODE_RUNTIME_HEALTH = "http://127.0.0.1:9094/health"
HARDENING = {"security_opt": ["no-new-privileges:true"], "cap_drop": ["ALL"]}


class DeployError(RuntimeError):
    """The Docker engine refused a step; the message says which container and why."""


class ContainerExists(DeployError):
    """A container of that name exists and `replace` was not given."""


@dataclass(frozen=True)
class Mount:
    """A bind mount (host path) or named volume; `read_only` is the ro/rw mode."""

    source: str
    target: str
    read_only: bool
    kind: str = "bind"  # "bind" | "volume"

    @property
    def mode(self) -> str:
        return "ro" if self.read_only else "rw"


@dataclass(frozen=True)
class PortBinding:
    """Container port published on `host_ip:host_port`."""

    container_port: int
    host_ip: str
    host_port: int


@dataclass(frozen=True)
class HealthCheck:
    """Docker health check (`test` in exec form)."""

    test: list[str]
    interval_s: int = 30
    timeout_s: int = 10
    retries: int = 3
    start_period_s: int = 30

    def to_docker(self) -> dict[str, Any]:
        """The engine's form: durations in nanoseconds."""
        ns = 1_000_000_000
        return {
            "test": ["CMD", *self.test],
            "interval": self.interval_s * ns,
            "timeout": self.timeout_s * ns,
            "retries": self.retries,
            "start_period": self.start_period_s * ns,
        }


@dataclass(frozen=True)
class NetworkSpec:
    """A user-defined bridge network; `internal` ones have no route outside the host."""

    name: str
    internal: bool


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one container."""

    name: str
    role: str  # superlink | serverapp | fleet-proxy | site
    image: str
    command: list[str]  # empty: the image's own CMD
    mounts: list[Mount]
    networks: list[str]  # the first is the one the container is created on
    aliases: list[str]  # DNS names of the container on each of its networks
    user: str
    healthcheck: HealthCheck
    environment: dict[str, str] = field(default_factory=dict)
    ports: list[PortBinding] = field(default_factory=list)
    restart_policy: str = "unless-stopped"

    def docker_create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `client.containers.create` (networks beyond the first are connected later)."""
        volumes = {m.source: {"bind": m.target, "mode": m.mode} for m in self.mounts}
        ports = {f"{p.container_port}/tcp": (p.host_ip, p.host_port) for p in self.ports}
        return {
            "image": self.image,
            "command": list(self.command) or None,
            "name": self.name,
            "user": self.user,
            "environment": dict(self.environment),
            "volumes": volumes,
            "ports": ports,
            "healthcheck": self.healthcheck.to_docker(),
            "restart_policy": {"Name": self.restart_policy},
            "labels": {"org.fedslide.role": self.role},
            "detach": True,
            **{k: list(v) for k, v in HARDENING.items()},
        }


@dataclass(frozen=True)
class DeploymentPlan:
    """Networks, named volumes and containers, in start order."""

    networks: list[NetworkSpec]
    volumes: list[str]
    containers: list[ContainerSpec]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (what `--dry-run` prints)."""
        return {
            "networks": [asdict(n) for n in self.networks],
            "volumes": list(self.volumes),
            "containers": [asdict(c) for c in self.containers],
        }


def _ro(source: Path | str, target: str) -> Mount:
    return Mount(str(source), target, read_only=True)


def _rw(source: Path | str, target: str) -> Mount:
    return Mount(str(source), target, read_only=False)


def _coordinator_specs(cfg: DeployConfig, net: dict[str, str]) -> list[ContainerSpec]:
    """SuperLink, ServerApp runtime (SuperExec) and Fleet proxy of the coordinating site."""
    assert cfg.coordinator is not None
    coord, certs, p = cfg.coordinator, cfg.certs_dir, cfg.project
    tls_files = [
        _ro(certs / "ca.crt", "/certs/ca.crt"),
        _ro(certs / "server.pem", "/certs/server.pem"),
        _ro(certs / "server.key", "/certs/server.key"),
    ]
    secret = _ro(coord.superexec_secret, "/secrets/superexec.secret")
    port = str(SUPERLINK_PORT)
    superlink = ContainerSpec(
        name=f"{p}-superlink",
        role="superlink",
        image=cfg.images.superlink,
        command=[
            "--ssl-ca-certfile",
            "/certs/ca.crt",
            "--ssl-certfile",
            "/certs/server.pem",
            "--ssl-keyfile",
            "/certs/server.key",
            "--enable-supernode-auth",
            "--database",
            "/app/state/superlink.db",
            "--disable-runtime-dependency-installation",
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            "/secrets/superexec.secret",
            "--host",
            "0.0.0.0",
            "--port",
            port,
        ],
        mounts=[*tls_files, secret, Mount(f"{p}-{coord.state_volume}", "/app/state", read_only=False, kind="volume")],
        networks=[net["edge"], net["coordinator"]],  # edge first: it carries the published port
        aliases=["superlink"],
        user=APP_UID,
        healthcheck=HealthCheck(
            ["python", "/opt/fedslide/healthcheck.py", f"https://127.0.0.1:{port}/health", "--ca", "/certs/ca.crt"]
        ),
        environment=dict(QUIET_FLOWER),
        ports=[PortBinding(SUPERLINK_PORT, cfg.control_bind, cfg.superlink_port)],
    )
    serverapp = ContainerSpec(
        name=f"{p}-serverapp",
        role="serverapp",
        image=cfg.images.serverapp,
        command=[
            "--runtime-api-address",
            f"superlink:{port}",
            "--root-certificates",
            "/certs/ca.crt",
            "--superexec-auth-secret-file",
            "/secrets/superexec.secret",
            "--health-server-address",
            SUPEREXEC_HEALTH,
        ],
        mounts=[_ro(certs / "ca.crt", "/certs/ca.crt"), secret, _rw(coord.runs_dir, "/data/runs")],
        networks=[net["coordinator"]],
        aliases=["serverapp"],
        user=APP_UID,
        healthcheck=HealthCheck(
            ["python", "/opt/fedslide/healthcheck.py", f"grpc://{SUPEREXEC_HEALTH}"], start_period_s=60
        ),
        environment=dict(QUIET_FLOWER),
    )
    proxy_networks = [net["edge"], net["coordinator"]] + ([net["hospitals"]] if cfg.sites else [])
    fleet_proxy = ContainerSpec(
        name=f"{p}-fleet-proxy",
        role="fleet-proxy",
        image=cfg.images.fleet_proxy,
        command=[],
        mounts=tls_files,
        networks=proxy_networks,
        aliases=[FLEET_PROXY_HOST],
        user=NGINX_UID,
        healthcheck=HealthCheck(
            ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8081/healthz"], timeout_s=5, start_period_s=10
        ),
        ports=[PortBinding(FLEET_PORT, cfg.fleet_bind, cfg.fleet_port)],
    )
    return [superlink, serverapp, fleet_proxy]


def _site_spec(cfg: DeployConfig, site: SiteConfig, network: str) -> ContainerSpec:
    """One hospital SuperNode: data read-only, runs/ writable, CA and its own key read-only, no published port."""
    if cfg.coordinator is not None:
        superlink = f"{FLEET_PROXY_HOST}:{FLEET_PORT}"  # the proxy on the internal network
    else:
        superlink = f"{cfg.superlink_address}:{cfg.fleet_port}"
    return ContainerSpec(
        name=f"{cfg.project}-{site.name}",
        role="site",
        image=cfg.images.site,
        command=[
            "--superlink",
            superlink,
            "--root-certificates",
            "/certs/ca.crt",
            "--auth-supernode-private-key",
            "/keys/site.key",
            "--node-config",
            f'site-dir="/data/site" site-name="{site.name}"',
        ],
        mounts=[
            _ro(site.data_dir, "/data/site"),
            _rw(site.data_dir / "runs", "/data/site/runs"),
            _ro(cfg.certs_dir / "ca.crt", "/certs/ca.crt"),
            _ro(cfg.site_key(site), "/keys/site.key"),
        ],
        networks=[network],
        aliases=[site.name],
        user=APP_UID,
        healthcheck=HealthCheck(
            ["python", "/opt/fedslide/healthcheck.py", SUPERNODE_RUNTIME_HEALTH], start_period_s=60
        ),
        environment=dict(QUIET_FLOWER),
    )


def build_plan(cfg: DeployConfig) -> DeploymentPlan:
    """Networks, volumes and container specs for `cfg` (checked first; raises ConfigError). Touches nothing."""
    cfg.check()
    p = cfg.project
    net = {
        "edge": f"{p}-edge",  # published ports; the coordinating site's only route out
        "coordinator": f"{p}-coordinator",  # internal: SuperLink <-> ServerApp runtime <-> Fleet proxy
        "hospitals": f"{p}-hospitals",  # internal: local sites <-> Fleet proxy (one-host demo)
        "site": f"{p}-site",  # a hospital host: outbound to the coordinating site only (firewall)
    }
    networks: list[NetworkSpec] = []
    containers: list[ContainerSpec] = []
    volumes: list[str] = []
    if cfg.coordinator is not None:
        networks += [NetworkSpec(net["edge"], internal=False), NetworkSpec(net["coordinator"], internal=True)]
        volumes.append(f"{p}-{cfg.coordinator.state_volume}")
        containers += _coordinator_specs(cfg, net)
    if cfg.sites:
        site_net = net["hospitals"] if cfg.coordinator is not None else net["site"]
        networks.append(NetworkSpec(site_net, internal=cfg.coordinator is not None))
        containers += [_site_spec(cfg, site, site_net) for site in cfg.sites]
    return DeploymentPlan(networks, volumes, containers)


def _docker_errors() -> Any:
    import docker.errors

    return docker.errors


def _ensure_network(client: Any, spec: NetworkSpec) -> None:
    errors = _docker_errors()
    try:
        client.networks.get(spec.name)
    except errors.NotFound:
        client.networks.create(spec.name, driver="bridge", internal=spec.internal, labels={"org.fedslide": "1"})


def _ensure_image(client: Any, image: str) -> None:
    errors = _docker_errors()
    try:
        client.images.get(image)
        return
    except errors.ImageNotFound:
        pass
    try:
        client.images.pull(image)
    except errors.APIError as exc:
        raise DeployError(
            f"image {image} is neither local nor pullable ({exc}); build it from the repository root, e.g. "
            f"docker build -f deploy/site.Dockerfile -t {image} ."
        ) from exc


def _remove_existing(client: Any, name: str, replace: bool) -> None:
    errors = _docker_errors()
    try:
        existing = client.containers.get(name)
    except errors.NotFound:
        return
    if not replace:
        raise ContainerExists(f"container {name} already exists; pass --replace to stop and recreate it")
    existing.stop()
    existing.remove()


def _prepare_host_dirs(plan: DeploymentPlan) -> None:
    """Create missing host folders of writable bind mounts (e.g. <site>/runs), which Docker would make root's."""
    for spec in plan.containers:
        for m in spec.mounts:
            if m.kind == "bind" and not m.read_only:
                Path(m.source).mkdir(parents=True, exist_ok=True)


def launch(plan: DeploymentPlan, client: Any | None = None, replace: bool = False) -> list[str]:
    """Create networks and volumes, then create and start every container of `plan`; returns container names.

    `client` defaults to `docker.from_env()`. An existing container of the same name is refused unless
    `replace` (then stopped and removed first; named volumes such as the SuperLink database are kept).
    """
    if client is None:
        import docker

        client = docker.from_env()
    errors = _docker_errors()
    _prepare_host_dirs(plan)
    for network in plan.networks:
        _ensure_network(client, network)
    for volume in plan.volumes:
        try:
            client.volumes.get(volume)
        except errors.NotFound:
            client.volumes.create(name=volume, labels={"org.fedslide": "1"})
    started: list[str] = []
    for spec in plan.containers:
        _remove_existing(client, spec.name, replace)
        _ensure_image(client, spec.image)
        kwargs = spec.docker_create_kwargs()
        first, *others = spec.networks
        kwargs["network"] = first
        kwargs["networking_config"] = {first: client.api.create_endpoint_config(aliases=list(spec.aliases))}
        try:
            container = client.containers.create(**kwargs)
            for name in others:
                client.networks.get(name).connect(container, aliases=list(spec.aliases))
            container.start()
        except errors.APIError as exc:
            raise DeployError(f"container {spec.name} could not be started: {exc}") from exc
        started.append(spec.name)
    return started


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `deploy` subcommand."""
    p = subparsers.add_parser(
        "deploy",
        help="start the coordinating site and/or hospital sites as Docker containers",
        description="Create and start the containers described by the [deploy] section of --config (see "
        "configs/deploy.example.toml and deploy/README.md): SuperLink, ServerApp runtime and Fleet proxy for the "
        "coordinating site, one SuperNode per hospital site. --dry-run prints the container specs as JSON.",
    )
    add_config_arguments(p, example="fleet-port=443")
    p.add_argument("--dry-run", action="store_true", help="print the container specs as JSON; start nothing")
    p.add_argument("--replace", action="store_true", help="stop and recreate containers that already exist")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Build the plan; print it (--dry-run) or launch it. Returns an exit code."""
    if args.config is None:
        raise ConfigError(
            "fedslide deploy needs --config FILE with a [deploy] section (see configs/deploy.example.toml)"
        )
    plan = build_plan(load_deploy_config(args.config, args.overrides))
    if args.dry_run:
        print(json.dumps(plan.to_dict(), indent=2))
        return EXIT_OK
    try:
        names = launch(plan, replace=args.replace)
    except ContainerExists as exc:
        print(f"fedslide deploy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DeployError as exc:
        print(f"fedslide deploy: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except _docker_errors().DockerException as exc:
        print(f"fedslide deploy: cannot talk to the Docker engine: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"deploy: started {len(names)} containers: {', '.join(names)}")
    return EXIT_OK
