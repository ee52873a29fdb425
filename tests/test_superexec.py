"""The site's warm SuperExec (client.superexec): what it launches, and that a task runs the FAB's code.

A whole federation through it, with real SuperLink/SuperNode processes, is in tests/test_federation_processes.py.
"""

from __future__ import annotations

import hashlib
import io
import socket
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import flwr.supernode.runtime.run_clientapp as runtime
import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedslide.client.superexec import APP_MODULES, PRELOAD, ForkExecutor, installed_fab_dir, wait_for_runtime_api
from fedslide.common.flower_app import APP_PACKAGES
from fedslide.common.flower_compat import reuse_installed_fab

REPO = Path(__file__).resolve().parents[1]


def _fab_copy_imported(tmp_path: Path, forget: bool) -> str:
    """In a fresh interpreter: preload the installed app as the SuperExec does, then (optionally) forget it, and
    load the ClientApp from a FAB directory with Flower's own loader (what `run_clientapp` calls); which copy the
    loader returned."""
    fab = tmp_path / ("fab-forget" if forget else "fab-keep")
    (fab / "fedslide" / "client").mkdir(parents=True)  # as stage_app lays the app out in a FAB
    (fab / "fedslide" / "client" / "__init__.py").write_text("")
    (fab / "fedslide" / "client" / "client_app.py").write_text("app = 'fab'\n")
    script = textwrap.dedent(f"""
        import fedslide.client.client_app
        from flwr.supercore.object_ref import load_app
        from fedslide.client.superexec import forget_app_modules
        if {forget!r}:
            assert "fedslide.client.client_app" in forget_app_modules()
        app = load_app("fedslide.client.client_app:app", ValueError, project_dir={str(fab)!r})
        print(app if isinstance(app, str) else "installed")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_task_imports_the_app_from_its_fab_not_the_preloaded_copy(tmp_path: Path) -> None:
    assert _fab_copy_imported(tmp_path, forget=True) == "fab"
    # without forgetting, the preloaded (installed) module would shadow the FAB's: what forget_app_modules prevents
    assert _fab_copy_imported(tmp_path, forget=False) == "installed"


def test_preload_names_the_app_entry_module_and_only_packages_it_forgets() -> None:
    app_ref = (REPO / "pyproject.toml").read_text().split('clientapp = "', 1)[1].split('"', 1)[0]
    assert app_ref.split(":")[0] in PRELOAD  # the ClientApp module (and so its imports) is preloaded
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.partition(".")[0] for p in packages} == set(APP_PACKAGES)  # one import package: fedslide


def _spec(task_type: TaskType) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:9",
        token="t0k3n",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=None,
        suppress_output=False,
        task_id=7,
    )


def test_the_executor_takes_clientapp_tasks_only() -> None:
    executor = ForkExecutor()
    types, fabs = executor.get_eligible_capacity({TaskType.CLIENT_APP, TaskType.SERVER_APP, TaskType.SIMULATION})
    assert types == {TaskType.CLIENT_APP} and fabs == set()
    result = executor.launch(_spec(TaskType.SERVER_APP))
    assert result.status == LaunchResultStatus.FAILED and "ClientApp tasks only" in str(result.message)
    assert executor.children == [] and executor.launched == 0


def test_it_waits_for_its_supernodes_runtime_api_and_gives_up_when_the_supernode_is_gone() -> None:
    # the SuperExec starts beside its SuperNode: it waits for the port, or stops when the SuperNode has died
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert wait_for_runtime_api(f"127.0.0.1:{port}", parent_pid=None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not wait_for_runtime_api(f"127.0.0.1:{port}", parent_pid=dead.pid)  # nothing listens any more


def _fake_fab(flwr_home: Path, fab_hash: str, body: str = "app = 'fab'\n") -> Path:
    """A FAB as Flower installs it: `<FLWR_HOME>/apps/<publisher>.<name>.<version>.<hash[:8]>/` with the app."""
    fab = flwr_home / "apps" / f"fedslide.fedslide.0.1.0.{fab_hash[:8]}"
    (fab / "fedslide" / "client").mkdir(parents=True)
    (fab / "pyproject.toml").write_text("[project]\nname = 'fedslide'\n")
    (fab / "fedslide" / "client" / "__init__.py").write_text("")
    (fab / "fedslide" / "client" / "client_app.py").write_text(body)
    return fab


def test_the_installed_fab_is_found_by_its_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    fab = _fake_fab(tmp_path, "ab" * 32)
    assert installed_fab_dir("ab" * 32) == fab
    assert installed_fab_dir("cd" * 32) is None  # another app version: not installed
    (fab / "pyproject.toml").unlink()
    assert installed_fab_dir("ab" * 32) is None  # an installation that is not complete is not used


def test_a_warm_child_skips_reinstalling_its_own_fab_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "install_from_fab", runtime.install_from_fab)  # restored after the test
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as z:
        z.writestr("pyproject.toml", "")  # no .info/CONTENT: Flower's installer refuses it
    fab_bytes = payload.getvalue()
    fab_dir = _fake_fab(tmp_path, hashlib.sha256(fab_bytes).hexdigest())
    reuse_installed_fab(hashlib.sha256(fab_bytes).hexdigest(), fab_dir)
    assert runtime.install_from_fab(fab_bytes, skip_prompt=True) == fab_dir
    with pytest.raises(Exception, match="incorrect format"):  # any other FAB goes to Flower's installer
        runtime.install_from_fab(fab_bytes + b"\0", skip_prompt=True)


def test_after_a_fabs_first_task_its_app_is_imported_here_and_handed_to_the_next_tasks(tmp_path: Path) -> None:
    """In a fresh interpreter that has preloaded the installed app, as the SuperExec does: warm_up imports the
    FAB's copy in its place, a later FAB's tasks run cold, and a FAB whose code fails to import stays cold."""
    good, broken = "ab" * 32, "ef" * 32
    _fake_fab(tmp_path, good)
    _fake_fab(tmp_path / "other", broken, body="raise ImportError('broken app')\n")
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["FLWR_HOME"] = {str(tmp_path)!r}
        import fedslide.client.client_app
        import fedslide.client.site_run as old_site_run
        from fedslide.client.superexec import ForkExecutor
        from fedslide.common.feature_store import FeatureStore
        old_site_run._held_features = FeatureStore(2**20)  # as if the old app held the site's files
        ex = ForkExecutor()
        assert ex.warm_up({good!r})
        assert old_site_run.held_features() is None  # let go with the old app's modules
        print(sys.modules["fedslide.client.client_app"].app, ex.warm_fab == {good!r}, ex.warm_dir.name)
        os.environ["FLWR_HOME"] = {str(tmp_path / "other")!r}
        assert not ex.warm_up({broken!r})
        print(ex.warm_fab, "fedslide.client.client_app" in sys.modules, sorted(ex._cold_fabs) == [{broken!r}])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == f"fab True fedslide.fedslide.0.1.0.{good[:8]}"
    assert lines[-1] == "None False True"
    assert APP_MODULES == ("fedslide.client.client_app",)


def test_the_executor_holds_the_sites_features_once_the_app_is_imported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedslide.client import site_run
    from tests.feature_sites import make_site

    site = make_site(tmp_path, "s1", {"train": 2, "test": 2}, seed=1)
    try:
        assert not ForkExecutor(site, 2**30).hold_features()  # no app imported yet: the tasks read the files
        executor = ForkExecutor(site, 2**30)
        executor.warm_fab = "ab" * 32  # as after warm_up
        assert executor.hold_features() and len(site_run.held_features() or []) == 8
        assert not ForkExecutor(None, 2**30).hold_features() and not ForkExecutor(site, 0).hold_features()
        (site / "labels.csv").unlink()
        with caplog.at_level("WARNING", logger="fedslide.client.superexec"):
            assert not executor.hold_features()  # a site it cannot read: left to the tasks, which report it
            assert not executor.hold_features()  # the same problem after the next task: not logged again
        assert "labels.csv" in caplog.text and str(site) in caplog.text
        assert caplog.text.count("not holding the feature files") == 1
    finally:
        site_run.release_site_features()
