"""The installed distribution: one import package, `fedslide`, with its settings files."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_source_package_is_listed_for_the_wheel() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "fedslide." + ".".join(p.parent.relative_to(REPO).parts)
        for top in ("common", "client", "server", "deploy", "configs")
        for p in (REPO / top).rglob("__init__.py")
    }
    assert found == listed


@pytest.mark.slow
def test_the_wheel_adds_one_top_level_package_to_a_fresh_environment(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    (wheel,) = wheels.glob("fedslide-*.whl")
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"fedslide", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    before = {p.name for p in site.iterdir()}
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    added = {p.name for p in site.iterdir()} - before
    assert {a for a in added if not a.endswith(".dist-info")} == {"fedslide"}, added
    shipped = subprocess.run(
        [
            py,
            "-c",
            "from importlib.resources import files; "
            "print(sorted(p.name for p in files('fedslide.configs').iterdir() if p.name.endswith('.toml')))",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert "defaults.toml" in shipped and "demo.toml" in shipped
