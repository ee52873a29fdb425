"""The Flower app as `flwr run` receives it: where its code lives, the folder handed over, its manifest and run config;
and what a site checks in an app bundle (FAB) before it answers a message (`vet_fab`).

From the source tree the manifest is the project's `pyproject.toml`. An installed fedslide (a wheel: no
`pyproject.toml` beside its packages) gets the same manifest written from the package's metadata, the
constants below and the federation config's defaults; a test holds the two equal.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fedslide.common.config.federation import FederationConfig

APP_DIR = Path(__file__).resolve().parents[1]  # the source tree (with pyproject.toml), or site-packages/fedslide
NAMESPACE = "fedslide"  # the one import package; a FAB holds it as a folder of that name
APP_PACKAGES = (NAMESPACE,)  # the app's code: every module under fedslide.*
APP_FOLDERS = ("server", "client", "common", "deploy", "configs")  # the folders that make up fedslide.*
MANIFEST = "pyproject.toml"
PUBLISHER = "fedslide"
COMPONENTS = {"serverapp": "fedslide.server.server_app:app", "clientapp": "fedslide.client.client_app:app"}
FAB_INCLUDE = [f"{NAMESPACE}/**/*.py", f"{NAMESPACE}/**/*.toml", "*.toml"]  # what the sites run

# ---- what a site accepts of a FAB (client.superexec): it runs its own installed ClientApp, never the FAB's --------
SITE_FOLDERS = ("client", "common")  # the code a ClientApp runs (the client layer imports only common)
ALLOW_FAB_CODE = "allow-fab-code"  # node config: true = the site runs the FAB's code (development only)
ALLOWED_FAB_HASHES = "allowed-fab-hashes"  # node config: SHA-256s (comma/space separated) of the FABs a site accepts
REFUSALS = {  # kind -> the fixed text the coordinator is told (egress.ErrorCode.CODE_REFUSED; details: the site's log)
    "unreadable": "the FAB is not a zip archive with a pyproject.toml manifest",
    "other-app": "the FAB declares another app than fedslide's ClientApp",
    "other-version": "the FAB declares another fedslide version than the one installed at this site",
    "hash-not-allowed": "the FAB's SHA-256 is not on this site's allowed-fab-hashes",
    "code-differs": "the FAB's client code differs from the fedslide code installed at this site",
    "bad-node-config": "this site's allowed-fab-hashes node config is invalid",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def toml_value(v: Any) -> str:
    """A scalar as TOML (the run config holds only scalars)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _table(values: dict[str, Any]) -> list[str]:
    return [f'"{k}" = {toml_value(v)}' for k, v in values.items()]


def write_run_config(path: Path, cfg: FederationConfig) -> None:
    """The run config as the flat TOML file `flwr run --run-config FILE` reads."""
    text = "\n".join(_table(cfg.to_run_config())) + "\n"
    tomllib.loads(text)  # what flwr will read
    path.write_text(text)


def app_manifest(distribution: str = "fedslide") -> str:
    """The app's `pyproject.toml` for an installed fedslide: [project] from the package's metadata, and
    [tool.flwr.app] with every run-config key at its default ("" = unset: Flower has no null)."""
    meta = metadata.metadata(distribution)
    requires = [r for r in metadata.requires(distribution) or [] if "extra ==" not in r]  # not the test extras
    lines = [
        "[project]",
        *_table({"name": meta["Name"], "version": meta["Version"], "description": meta["Summary"] or ""}),
        f"license = {{ text = {toml_value(meta['License'] or 'UNKNOWN')} }}",
        f"dependencies = [{', '.join(toml_value(r) for r in requires)}]",
        "",
        "[tool.flwr.app]",
        f"publisher = {toml_value(PUBLISHER)}",
        f"fab-include = [{', '.join(toml_value(p) for p in FAB_INCLUDE)}]",
        "",
        "[tool.flwr.app.components]",
        *_table(COMPONENTS),
        "",
        "[tool.flwr.app.config]",
        *_table(FederationConfig().to_run_config(unset="")),
    ]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)
    return text


def stage_app(app_dir: Path, stage: Path) -> Path:
    """`stage` (emptied first) with the app's folders under `stage/fedslide/` and its manifest, for `flwr run` to
    bundle: the FAB then holds the `fedslide` package, which Flower imports from the bundle's folder.

    Flower lists every file under the directory it bundles before applying `fab-include`: in a source tree with
    its virtual environment inside, ≈ 38,000 files and ≈ 5 s of CPU before the run is submitted. The bundle made
    from the copy holds the same files. Without a manifest in `app_dir` (an installed fedslide) it is written
    (`app_manifest`).
    """
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    from_source = (app_dir / MANIFEST).is_file()
    for path in app_dir.iterdir():
        if from_source and path.is_file() and path.suffix == ".toml":
            shutil.copy2(path, stage / path.name)
        elif path.is_dir() and path.name in APP_FOLDERS:
            shutil.copytree(path, stage / NAMESPACE / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if not from_source:
        (stage / MANIFEST).write_text(app_manifest())
    return stage


@dataclass(frozen=True)
class FabRefusal:
    """Why a site refuses a FAB: `kind` (a key of REFUSALS: what the coordinator is told) and `detail`, for the
    site's log only."""

    kind: str
    detail: str


def allowed_fab_hashes(node_config: Mapping[str, Any]) -> frozenset[str]:
    """The node config's `allowed-fab-hashes` (empty: no allow-list); ValueError naming the key, the bad entry and
    what is allowed."""
    value = node_config.get(ALLOWED_FAB_HASHES, "")
    if not isinstance(value, str):
        raise ValueError(f"node config {ALLOWED_FAB_HASHES} must be a string of SHA-256s, got {value!r}")
    hashes = frozenset(h.lower() for h in re.split(r"[,\s]+", value) if h)
    bad = sorted(h for h in hashes if not _SHA256.fullmatch(h))
    if bad:
        raise ValueError(
            f"node config {ALLOWED_FAB_HASHES}: {bad[0]!r} is not a SHA-256 (64 hex digits; e.g. `sha256sum app.fab`)"
        )
    return hashes


def vet_fab(
    fab: bytes,
    node_config: Mapping[str, Any],
    app_dir: Path = APP_DIR,
    installed_version: str | None = None,
) -> FabRefusal | None:
    """None when a site may answer a message of this FAB with its installed ClientApp: the FAB's manifest declares
    fedslide's ClientApp at the installed version, its hash is on `allowed-fab-hashes` (when the node config sets
    one), and every file of its client code (SITE_FOLDERS) is the installed one's; otherwise why not. Nothing of
    the FAB is installed or imported."""
    try:
        allowed = allowed_fab_hashes(node_config)
    except ValueError as exc:
        return FabRefusal("bad-node-config", str(exc))
    digest = hashlib.sha256(fab).hexdigest()
    if allowed and digest not in allowed:
        return FabRefusal("hash-not-allowed", f"FAB {digest} is not one of the {len(allowed)} allowed")
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            manifest = tomllib.loads(archive.read(MANIFEST).decode())
            files = {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return FabRefusal("unreadable", f"FAB {digest[:12]}: {exc}")
    project = manifest.get("project", {})
    app = manifest.get("tool", {}).get("flwr", {}).get("app", {})
    declared = (project.get("name"), app.get("publisher"), app.get("components", {}).get("clientapp"))
    if declared != (NAMESPACE, PUBLISHER, COMPONENTS["clientapp"]):
        return FabRefusal(
            "other-app",
            f"FAB {digest[:12]} declares name, publisher, clientapp = {declared}; this site runs "
            f"{(NAMESPACE, PUBLISHER, COMPONENTS['clientapp'])}",
        )
    installed = installed_version or metadata.version(NAMESPACE)
    if project.get("version") != installed:
        return FabRefusal(
            "other-version",
            f"FAB {digest[:12]} declares fedslide {project.get('version')!r}; installed here: {installed!r}",
        )
    prefixes = tuple(f"{NAMESPACE}/{folder}/" for folder in SITE_FOLDERS)
    for name, content in sorted(files.items()):
        if not name.startswith(prefixes):
            continue
        local = app_dir / name.removeprefix(f"{NAMESPACE}/")
        if not local.is_file() or local.read_bytes() != content:
            return FabRefusal("code-differs", f"FAB {digest[:12]}: {name} is not the file installed here ({local})")
    return None
