"""The house's layers, as import-linter reads them from the code (pyproject's [tool.importlinter])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def test_the_layer_contract_holds() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "0 broken" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_the_graph_the_contract_reads_has_the_expected_arrows() -> None:
    """The contract is not vacuous: orchestration imports both sides, both sides import the ground, and the ground
    imports neither."""
    graph = grimp.build_graph(
        "fedslide.common", "fedslide.client", "fedslide.server", "fedslide.deploy", cache_dir=None
    )

    def imports(a: str, b: str) -> bool:
        return graph.chain_exists(importer=a, imported=b, as_packages=True)

    assert imports("fedslide.deploy", "fedslide.client") and imports("fedslide.deploy", "fedslide.server")
    assert imports("fedslide.client", "fedslide.common") and imports("fedslide.server", "fedslide.common")
    assert not imports("fedslide.common", "fedslide.client") and not imports("fedslide.common", "fedslide.server")
    assert not imports("fedslide.client", "fedslide.server") and not imports("fedslide.server", "fedslide.client")
    assert not imports("fedslide.common", "fedslide.deploy")
