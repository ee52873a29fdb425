"""mypy over the installed package's import names (`fedslide.*`); pyproject's [tool.mypy] holds the settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "client", "server", "deploy", "configs")


def test_mypy_finds_no_type_errors(tmp_path: Path) -> None:
    """The editable install maps folders to `fedslide.*` through an import hook, which mypy does not follow; a tree
    of links gives mypy the same names."""
    package = tmp_path / "src" / "fedslide"
    package.mkdir(parents=True)
    for folder in FOLDERS:
        (package / folder).symlink_to(REPO / folder, target_is_directory=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "-p",
            "fedslide",
        ],
        cwd=tmp_path / "src",
        capture_output=True,
        text=True,
        timeout=900,
        env={"MYPYPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
