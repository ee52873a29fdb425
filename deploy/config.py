"""Config of `fedslide deploy` (section [deploy]): which containers this host runs and what they mount.

A host runs the coordinating site ([deploy.coordinator]: SuperLink, ServerApp runtime, Fleet proxy), one or
more hospital sites ([[deploy.sites]]), or both (the one-host demo). Paths are resolved against the current
directory; every file and folder a container mounts must exist, and the error names the path that does not.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import Field, field_validator

from fedslide.common.config.base import ConfigError, StageConfig, load_config

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # also a container and DNS label
PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62})?)*")
RESERVED_SITE_NAMES = frozenset({"ca", "server", "superlink", "serverapp", "fleet-proxy"})
FLEET_PROXY_HOST = "fleet-proxy"  # network alias of the Fleet proxy; local sites dial it


def _existing_dir(path: Path, what: str) -> Path:
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"{what} {path} does not exist or is not a directory")
    return path


def _existing_file(path: Path, what: str) -> Path:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist or is not a file")
    return path


def _pinned_image(ref: str) -> str:
    """Refuse image references without an explicit tag (or digest) and the moving `latest` tag."""
    name, _, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    if not digest and not tag:
        raise ValueError(f"image {ref!r} has no tag: pin a version, e.g. {ref}:0.1.0")
    if tag == "latest":
        raise ValueError(f"image {ref!r} uses the moving tag 'latest': pin a version")
    return ref


class ImagesConfig(StageConfig):
    """Image references (pinned tags) of the four containers; build them from deploy/*.Dockerfile."""

    superlink: str = Field(default="fedslide/superlink:0.1.0", description="deploy/superlink.Dockerfile")
    serverapp: str = Field(default="fedslide/serverapp:0.1.0", description="deploy/serverapp.Dockerfile")
    fleet_proxy: str = Field(default="fedslide/fleet-proxy:0.1.0", description="deploy/fleet-proxy.Dockerfile")
    site: str = Field(default="fedslide/site:0.1.0", description="deploy/site.Dockerfile")

    @field_validator("superlink", "serverapp", "fleet_proxy", "site")
    @classmethod
    def _pinned(cls, value: str) -> str:
        return _pinned_image(value)


class SiteConfig(StageConfig):
    """One hospital site: its data folder (mounted read-only; <data-dir>/runs writable) and private key."""

    name: str = Field(description="site name, as given to `fedslide certs --sites`")
    data_dir: Path = Field(description="the site directory: slides/, labels.csv, features/, qc/, runs/")
    key_file: Path | None = Field(default=None, description="private key (default <certs-dir>/<name>.key)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SITE_NAME.fullmatch(value):
            raise ValueError(
                f"invalid site name {value!r}: use 1-64 letters, digits, '-' or '_', starting alphanumeric"
            )
        if value.lower() in RESERVED_SITE_NAMES:
            raise ValueError(f"site name {value!r} is reserved: {', '.join(sorted(RESERVED_SITE_NAMES))}")
        return value

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: Path) -> Path:
        return _existing_dir(value, "site data directory")


class CoordinatorConfig(StageConfig):
    """The coordinating site: SuperLink state, ServerApp outputs and the SuperExec shared secret."""

    runs_dir: Path = Field(description="writable folder for ServerApp outputs (mounted at /data/runs)")
    superexec_secret: Path = Field(description="file with the SuperLink/SuperExec shared secret (random bytes)")
    state_volume: str = Field(
        default="superlink-state", description="Docker volume holding the SuperLink database (kept across updates)"
    )

    @field_validator("runs_dir")
    @classmethod
    def _runs_dir(cls, value: Path) -> Path:
        return _existing_dir(value, "coordinator runs directory")

    @field_validator("superexec_secret")
    @classmethod
    def _secret(cls, value: Path) -> Path:
        path = _existing_file(value, "SuperExec secret file")
        if path.stat().st_size < 16:
            raise ValueError(f"SuperExec secret file {path} holds fewer than 16 bytes: write e.g. 32 random bytes")
        return path

    @field_validator("state_volume")
    @classmethod
    def _volume(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError(f"invalid Docker volume name {value!r}")
        return value


class DeployConfig(StageConfig):
    """What this host runs: the coordinating site, hospital sites, or both."""

    project: str = Field(default="fedslide", description="prefix of container, network and volume names")
    certs_dir: Path = Field(description="output folder of `fedslide certs` (ca.crt, server.pem/.key, <site>.key)")
    superlink_address: str | None = Field(
        default=None,
        description="host name the hospital sites dial (a SAN of server.pem); only without [deploy.coordinator] — "
        "with it, local sites dial the Fleet proxy on the internal network",
    )
    fleet_port: int = Field(
        default=9092,
        ge=1,
        le=65535,
        description="Fleet port: published by the coordinating site (the only port hospitals reach); the "
        "port hospital-only hosts dial",
    )
    fleet_bind: str = Field(default="0.0.0.0", description="host address the Fleet port is published on")
    superlink_port: int = Field(
        default=9093, ge=1, le=65535, description="host port of the SuperLink itself (Control API for `flwr`)"
    )
    control_bind: str = Field(default="127.0.0.1", description="loopback address the SuperLink port is published on")
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    coordinator: CoordinatorConfig | None = Field(default=None, description="run the coordinating site here")
    sites: list[SiteConfig] = Field(default_factory=list, description="hospital sites run on this host")

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        if not PROJECT_NAME.fullmatch(value):
            raise ValueError(f"invalid project name {value!r}: lowercase letters, digits, '-' or '_', at most 32")
        return value

    @field_validator("certs_dir")
    @classmethod
    def _certs_dir(cls, value: Path) -> Path:
        path = _existing_dir(value, "certificates directory")
        _existing_file(path / "ca.crt", "CA certificate")
        return path

    @field_validator("superlink_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if len(value) > 253 or not HOST_NAME.fullmatch(value):
                raise ValueError(f"invalid host name {value!r}: give a DNS name or IP address, without port") from None
        return value

    @field_validator("fleet_bind")
    @classmethod
    def _fleet_bind(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"fleet-bind must be an IP address, got {value!r}") from None
        return value

    @field_validator("control_bind")
    @classmethod
    def _control_bind(cls, value: str) -> str:
        try:
            loopback = ipaddress.ip_address(value).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"control-bind must be a loopback address such as 127.0.0.1, got {value!r}: the SuperLink port "
                "carries the unauthenticated Control API; hospitals reach the Fleet proxy instead"
            )
        return value

    def check(self) -> None:
        """Cross-field checks (the field validators ran already); raises ConfigError naming every problem."""
        problems: list[str] = []
        if self.coordinator is None and not self.sites:
            problems.append("nothing to deploy: add [deploy.coordinator] and/or [[deploy.sites]]")
        if self.fleet_port == self.superlink_port:
            problems.append(f"deploy.fleet-port and deploy.superlink-port must differ (both {self.fleet_port})")
        names = [s.name for s in self.sites]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"site names given more than once in [[deploy.sites]]: {', '.join(dupes)}")
        if self.coordinator is not None:
            if self.superlink_address is not None:
                problems.append(
                    "deploy.superlink-address is for hosts without [deploy.coordinator]; with it, the sites on this "
                    f"host dial the Fleet proxy ('{FLEET_PROXY_HOST}') on the internal network: remove the key"
                )
            for name in ("server.pem", "server.key"):
                if not (self.certs_dir / name).is_file():
                    problems.append(f"SuperLink TLS file {self.certs_dir / name} does not exist (run `fedslide certs`)")
        elif self.sites and self.superlink_address is None:
            problems.append(
                "deploy.superlink-address is required: the host name of the coordinating site's Fleet endpoint"
            )
        for site in self.sites:
            key = self.site_key(site)
            if not key.is_file():
                problems.append(f"private key of site {site.name}: {key} does not exist or is not a file")
        if problems:
            raise ConfigError("\n".join(problems))

    def site_key(self, site: SiteConfig) -> Path:
        """The private key file of `site` (its key-file, else <certs-dir>/<name>.key)."""
        return (
            (site.key_file if site.key_file is not None else self.certs_dir / f"{site.name}.key").expanduser().resolve()
        )


def load_deploy_config(path: Path | str | None, overrides: list[str] | None = None) -> DeployConfig:
    """Read [deploy] from a TOML file (plus `--set` overrides) and run every check; raises ConfigError."""
    cfg = load_config(DeployConfig, path=path, section="deploy", overrides=overrides)
    cfg.check()
    return cfg
