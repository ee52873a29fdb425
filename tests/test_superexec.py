"""The site's warm SuperExec (client.superexec): what it launches; that by default a task runs the site's installed
ClientApp and a FAB that is not the installed fedslide is refused before any of it runs; and that only with
`--allow-fab-code` a task runs the FAB's code.

A whole federation through it, with real SuperLink/SuperNode processes, is in tests/test_federation_processes.py;
a coordinator's modified FAB refused by real sites in tests/test_trust_site_code.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import socket
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flwr.supernode.runtime.run_clientapp as runtime
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedslide.client import superexec, supernode
from fedslide.client.superexec import APP_MODULES, PRELOAD, ForkExecutor, installed_fab_dir, wait_for_runtime_api
from fedslide.common.egress import ErrorCode
from fedslide.common.flower_app import APP_DIR, APP_PACKAGES, REFUSALS, stage_app, vet_fab
from fedslide.common.flower_compat import reuse_installed_fab, run_clientapp_without_fab, set_server_task_identity

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


def test_with_fab_code_allowed_a_task_imports_the_app_from_its_fab_not_the_preloaded_copy(tmp_path: Path) -> None:
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


# ---- the default: the installed ClientApp, after the FAB's check -------------------------------------------------
def _fab(tmp_path: Path, edit: Callable[[Path], None] | None = None) -> bytes:
    """A FAB of this fedslide as `flwr run` builds it (`stage_app`), after `edit(stage)`."""
    stage = stage_app(APP_DIR, tmp_path / "stage")
    if edit is not None:
        edit(stage)
    fab = build_fab_from_disk(stage)
    shutil.rmtree(stage)
    return fab


def _skip_egress_check(stage: Path) -> None:
    """The coordinator's edit of the ClientApp: no egress check, and a feature array added to every reply."""
    app = stage / "fedslide" / "client" / "client_app.py"
    app.write_text(app.read_text() + "\n# egress check removed; features sent\n")


def _set_manifest(stage: Path, old: str, new: str) -> None:
    manifest = stage / "pyproject.toml"
    text = manifest.read_text()
    assert old in text
    manifest.write_text(text.replace(old, new, 1))


def test_a_fab_of_the_installed_fedslide_is_accepted_and_any_other_is_refused_with_a_fixed_reason(
    tmp_path: Path,
) -> None:
    fab = _fab(tmp_path)
    assert vet_fab(fab, {}) is None
    digest = hashlib.sha256(fab).hexdigest()
    assert vet_fab(fab, {"allowed-fab-hashes": f"{'0' * 64}, {digest.upper()}"}) is None  # pinned and reviewed
    cases: dict[str, tuple[bytes, dict[str, Any]]] = {
        "code-differs": (_fab(tmp_path, _skip_egress_check), {}),
        "other-version": (_fab(tmp_path, lambda s: _set_manifest(s, 'version = "', 'version = "9')), {}),
        "other-app": (_fab(tmp_path, lambda s: _set_manifest(s, "fedslide.client.client_app:app", "evil:app")), {}),
        "hash-not-allowed": (fab, {"allowed-fab-hashes": "0" * 64}),
        "bad-node-config": (fab, {"allowed-fab-hashes": "abc"}),
        "unreadable": (b"not a zip", {}),
    }
    assert set(cases) == set(REFUSALS)
    for kind, (bundle, node_config) in cases.items():
        refusal = vet_fab(bundle, node_config)
        assert refusal is not None and refusal.kind == kind, (kind, refusal)
    refusal = vet_fab(cases["code-differs"][0], {})
    assert refusal is not None and "fedslide/client/client_app.py" in refusal.detail  # the site's log: which file
    refusal = vet_fab(fab, {"allowed-fab-hashes": "abc"})
    assert refusal is not None and "allowed-fab-hashes" in refusal.detail and "'abc'" in refusal.detail
    # another fedslide version installed here: the same FAB is refused
    refusal = vet_fab(fab, {}, installed_version="0.0.1")
    assert refusal is not None and refusal.kind == "other-version"
    # the server's code is the coordinator's business: a FAB whose server code differs is accepted
    assert vet_fab(_fab(tmp_path, lambda s: (s / "fedslide" / "server" / "extra.py").write_text("x = 1\n")), {}) is None


@pytest.fixture
def message(monkeypatch: pytest.MonkeyPatch) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # put back after the test
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))
    set_server_task_identity(11)  # as the ServerApp's process has it when it makes a message
    return Message(RecordDict({"config": ConfigRecord({"run-id": "r1"})}), dst_node_id=3, message_type="query.x")


def _context(node_config: dict[str, Any]) -> Context:
    return Context(run_id=11, node_id=3, node_config=node_config, state=RecordDict(), run_config={})


def test_a_refused_fab_gets_an_error_reply_and_the_installed_app_never_sees_the_message(
    tmp_path: Path, message: Message, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    answered: list[Message] = []

    def installed(message: Message, context: Context) -> Message:
        answered.append(message)
        return Message(RecordDict(), reply_to=message)

    monkeypatch.setattr(superexec, "installed_app", lambda: installed)
    site = tmp_path / "site"
    site.mkdir()
    with caplog.at_level("ERROR", logger="fedslide.client.superexec"):
        reply = superexec.answer_with_installed_app(_fab(tmp_path, _skip_egress_check))(
            message, _context({"site-dir": str(site)})
        )
    assert answered == [] and reply.has_error()
    # the coordinator is told why, in fixed words: the code and the refusal's text, nothing of the site's
    assert reply.error.code == ErrorCode.CODE_REFUSED and reply.error.reason.endswith(REFUSALS["code-differs"])
    assert str(site) not in reply.error.reason and "client_app.py" not in reply.error.reason
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    # the site's log names the file; its ledger holds the refusal it sent
    assert "REFUSED the query.x message of run 11" in caplog.text and "client_app.py" in caplog.text
    ledger = (site / "runs" / "r1" / "egress.jsonl").read_text()
    assert str(int(ErrorCode.CODE_REFUSED)) in ledger and "code-refused" in ledger, ledger

    reply = superexec.answer_with_installed_app(_fab(tmp_path))(message, _context({}))
    assert answered == [message] and not reply.has_error()


def test_the_installed_app_is_the_site_packages_own() -> None:
    from fedslide.client.client_app import app

    assert superexec.installed_app() is app


def test_by_default_a_task_neither_installs_nor_imports_its_fab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Flower's ClientApp process does with the task's FAB (install it, load its app), under
    `run_clientapp_without_fab`: the FAB's bytes go to the given answerer, nothing is unpacked or put on sys.path."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    for name in ("install_from_fab", "get_load_client_app_fn", "run_clientapp"):
        monkeypatch.setattr(runtime, name, getattr(runtime, name))  # restored after the test
    fab = _fab(tmp_path, _skip_egress_check)
    got: list[bytes] = []

    def flowers_steps(**args: Any) -> None:  # run_clientapp's own order: install, then load and call the app
        assert args == {"token": "t"}
        runtime.install_from_fab(fab, skip_prompt=True)
        load = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        assert load("fedslide/fedslide", "0.1.0", hashlib.sha256(fab).hexdigest()) == "answer"

    monkeypatch.setattr(runtime, "run_clientapp", flowers_steps)
    path_before = list(sys.path)
    run_clientapp_without_fab(lambda b: got.append(b) or "answer", token="t")
    assert got == [fab] and sys.path == path_before and not (tmp_path / "flwr-home").exists()


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


def test_with_fab_code_allowed_a_warm_child_skips_reinstalling_its_own_fab_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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


def test_with_fab_code_allowed_after_a_fabs_first_task_its_app_is_imported_here(tmp_path: Path) -> None:
    """In a fresh interpreter that has preloaded the installed app, as the SuperExec does, with FAB code allowed:
    warm_up imports the FAB's copy in its place, a later FAB's tasks run cold, and a FAB whose code fails to import
    stays cold."""
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
        ex = ForkExecutor(allow_fab_code=True)
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
        # with FAB code allowed, no app imported yet: the tasks read the files
        assert not ForkExecutor(site, 2**30, allow_fab_code=True).hold_features()
        executor = ForkExecutor(site, 2**30)  # the installed app, imported before any task
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


def _ok_child(*args: Any) -> None:
    """A forked task's stand-in: exits 0."""


def test_by_default_the_executor_forks_installed_tasks_and_never_imports_a_fab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(superexec, "run_installed_task", lambda spec: ran.append("installed"))
    monkeypatch.setattr(superexec, "run_task", lambda spec, warm_dir: ran.append("fab"))
    monkeypatch.setattr(superexec.ForkExecutor, "hold_features", lambda self: ran.append("hold") or True)
    spec = dataclasses.replace(_spec(TaskType.CLIENT_APP), fab_hash="ab" * 32)
    executor = ForkExecutor()
    assert executor.launch(spec).status == LaunchResultStatus.ACCEPTED
    executor.children[0].join(30)
    executor.reconcile()  # the task succeeded: the features are held again, no FAB is imported here
    assert executor.children == [] and executor.warm_fab is None and ran == ["hold"] and executor.launched == 1
    with pytest.raises(RuntimeError, match="--allow-fab-code"):
        executor.warm_up("ab" * 32)
    # what the fork runs: the installed task body by default, the FAB's only with FAB code allowed
    targets: list[Any] = []
    monkeypatch.setattr(executor._context, "Process", lambda target, args, name: targets.append(target) or _Done())
    executor.launch(spec)
    fab_executor = ForkExecutor(allow_fab_code=True)
    monkeypatch.setattr(fab_executor._context, "Process", lambda target, args, name: targets.append(target) or _Done())
    fab_executor.launch(spec)
    assert targets == [superexec.run_installed_task, superexec.run_task]


class _Done:
    """A finished child process, as `ForkExecutor` sees one."""

    pid = 0
    name = "clientapp-task-0"
    exitcode = 0

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False


def test_the_supernode_passes_the_fab_code_option_only_when_the_site_sets_it(tmp_path: Path) -> None:
    node = supernode.SuperNode("s1", tmp_path, "127.0.0.1:1", 9, tmp_path, None, None)
    assert "--allow-fab-code" not in node.superexec_argv(1) and "allow-fab-code" not in node.node_config()
    dev = supernode.SuperNode("s1", tmp_path, "127.0.0.1:1", 9, tmp_path, None, None, allow_fab_code=True)
    assert "--allow-fab-code" in dev.superexec_argv(1)
    args = ["--node-config", dev.node_config()]
    assert supernode.node_config_allows_fab_code(args) is True
    assert supernode.node_config_allows_fab_code(["--node-config", node.node_config()]) is False
    with pytest.raises(ValueError, match="allow-fab-code must be true or false"):
        supernode.node_config_allows_fab_code(["--node-config", 'allow-fab-code="yes"'])
    pinned = supernode.SuperNode(
        "s1", tmp_path, "127.0.0.1:1", 9, tmp_path, None, None, node_options={"allowed-fab-hashes": "ab" * 32}
    )
    assert f'allowed-fab-hashes="{"ab" * 32}"' in pinned.node_config()


def test_flowers_own_superexec_needs_the_sites_consent(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        supernode.main(["--superexec", "flower", "--superlink", "127.0.0.1:1", "--node-config", 'site-dir="/x"'])
    assert exit_info.value.code == 2 and "allow-fab-code=true" in capsys.readouterr().err


def test_flowers_superexec_is_started_only_where_the_site_allows_fab_code(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda command, *a, **k: started.append(list(command)))
    flowers = ["flower-superexec", "--insecure", "--allow-runtime-dependency-installation"]
    with pytest.raises(PermissionError, match="allow-fab-code=true"):
        supernode.WarmSuperExecLauncher()(flowers)
    supernode.WarmSuperExecLauncher(allow_fab_code=True)(flowers)
    assert started == [flowers]
    with pytest.raises(SystemExit):  # refused before the SuperNode starts
        supernode.main(["--superlink", "127.0.0.1:1", "--allow-runtime-dependency-installation"])
