"""The Flower app as `flwr run` receives it: where its code lives, the folder handed over, its manifest and run config.

From the source tree the manifest is the project's `pyproject.toml`. An installed fedslide (a wheel: no
`pyproject.toml` beside its packages) gets the same manifest written from the package's metadata, the
constants below and the federation config's defaults; a test holds the two equal.
"""

from __future__ import annotations

import shutil
import tomllib
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
