"""The README stays a user guide: short, with CI's commands, and every link it or docs/ makes resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_names_the_commands_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    ci = (REPO / ".ci" / "run").read_text()
    for command in re.findall(r"^\.venv/bin/(.+)$", ci, flags=re.MULTILINE):  # pip installs and the test run
        assert re.sub(r" -q\b", "", command) in readme, command
    assert 'pytest -m "not slow"' in readme


@pytest.mark.parametrize(
    "page", [REPO / "README.md", REPO / "deploy" / "README.md", *DOCS], ids=lambda p: str(p.relative_to(REPO))
)
def test_every_relative_link_resolves(page: Path) -> None:
    for link in LINK.findall(page.read_text()):
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.relative_to(REPO)}: link {link!r} names no file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), flags=re.MULTILINE)
            assert anchor in {_anchor(h) for h in headings}, f"{page.relative_to(REPO)}: no heading for {link!r}"
