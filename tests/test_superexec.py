"""The site's warm SuperExec (client.superexec): what it launches, and that a task runs the FAB's code.

A whole federation through it, with real SuperLink/SuperNode processes, is in tests/test_federation_processes.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from client.superexec import APP_PACKAGES, PRELOAD, ForkExecutor, wait_for_runtime_api

REPO = Path(__file__).resolve().parents[1]


def _fab_copy_imported(tmp_path: Path, forget: bool) -> str:
    """In a fresh interpreter: preload the installed app as the SuperExec does, then (optionally) forget it, and
    load the ClientApp from a FAB directory with Flower's own loader (what `run_clientapp` calls); which copy the
    loader returned."""
    fab = tmp_path / ("fab-forget" if forget else "fab-keep")
    (fab / "client").mkdir(parents=True)
    (fab / "client" / "__init__.py").write_text("")
    (fab / "client" / "client_app.py").write_text("app = 'fab'\n")
    script = textwrap.dedent(f"""
        import client.client_app
        from flwr.supercore.object_ref import load_app
        from client.superexec import forget_app_modules
        if {forget!r}:
            assert "client.client_app" in forget_app_modules()
        app = load_app("client.client_app:app", ValueError, project_dir={str(fab)!r})
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
    packages = (REPO / "pyproject.toml").read_text().split("include = [", 1)[1].split("]", 1)[0]
    assert {p.strip(' "*') for p in packages.split(",")} == set(APP_PACKAGES)


def _spec(task_type: TaskType) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:9", token="t0k3n", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                         suppress_output=False, task_id=7)


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
