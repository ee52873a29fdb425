"""Flower in one place (`common.flower_compat`): the version it was written for, its internal names, and the shorter
polling in Flower's SuperNode loop and object pulls (`client.supernode.main`).

Flower's real functions are called; each test restores the Flower state it changes (monkeypatch). The SuperNode
itself is replaced by a recorder only in the argument test: the real one runs in tests/test_federation_processes.py.
"""

from __future__ import annotations

import ast
import time
import tomllib
from pathlib import Path

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supernode import start_client_internal
from packaging.requirements import Requirement

from fedslide.client import supernode
from fedslide.common import flower_compat as fp

REPO = Path(__file__).resolve().parents[1]
PUBLIC_FLOWER = {"flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy"}  # Flower's API modules


@pytest.fixture
def flower_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's defaults, its loop module's `time` and its console log format, put back after the test."""
    from flwr.supercore.logger import console_handler

    for name in ("timestamps", "colored"):
        monkeypatch.setattr(console_handler, name, getattr(console_handler, name))
    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        function = getattr(inflatable_utils, name)
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__))
    monkeypatch.setattr(start_client_internal, "time", time)


def test_installed_flower_has_what_is_shortened(flower_state: None) -> None:
    # a Flower upgrade that renames these would silently bring back 3 s polls and 1 s back-offs: fail here instead
    assert fp.flower_internals_present() == []


def test_the_compat_module_names_the_flower_it_was_written_for(
    flower_state: None, flower_popen: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp.check_flower_version()  # the installed one
    fp.check_flower_version(f"{fp.FLOWER_MINOR}.9")
    with pytest.raises(fp.FlowerVersionError, match=rf"written for flwr {fp.FLOWER_MINOR}\.x, but flwr 1\.99\.0"):
        fp.check_flower_version("1.99.0")
    # another minor version installed: the patches refuse to apply, and Flower is left as it is
    monkeypatch.setattr(fp, "_installed_flower", lambda: "1.99.0")
    defaults = dict(inflatable_utils.pull_objects.__kwdefaults__)
    for patch in (
        fp.shorten_object_pulls,
        fp.shorten_supernode_polls,
        lambda: fp.start_superexec_through(print),
        lambda: fp.set_server_task_identity(1),
        lambda: fp.RuntimeHttpClient,
    ):
        with pytest.raises(fp.FlowerVersionError, match="flower_compat.py"):
            patch()
    assert inflatable_utils.pull_objects.__kwdefaults__ == defaults and start_client_internal.time is time


def test_flwr_is_pinned_to_the_minor_version_the_compat_module_was_written_for() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    flwr = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "flwr")
    major, minor = map(int, fp.FLOWER_MINOR.split("."))
    assert flwr.specifier.contains(f"{major}.{minor}.0") and flwr.specifier.contains(f"{major}.{minor}.9")
    assert not flwr.specifier.contains(f"{major}.{minor + 1}.0") and not flwr.specifier.contains(
        f"{major}.{minor - 1}.9"
    )


def test_every_internal_name_is_in_the_installed_flower() -> None:
    missing = []
    for name in fp.INTERNAL_NAMES:
        try:
            getattr(fp, name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name}: {exc}")
    assert missing == []
    with pytest.raises(AttributeError, match="no attribute 'not_a_flower_name'"):
        fp.not_a_flower_name  # noqa: B018


def test_only_the_compat_module_reaches_past_flowers_api() -> None:
    """fedslide's own modules import Flower's public API only; its internals go through common/flower_compat.py."""
    offenders = []
    for folder in ("common", "client", "server", "deploy"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "common" / "flower_compat.py":
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules = [node.module]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    modules = []
                offenders += [
                    f"{path.relative_to(REPO)}:{node.lineno} {m}"
                    for m in modules
                    if m.partition(".")[0] == "flwr" and m not in PUBLIC_FLOWER
                ]
            text = path.read_text()
            offenders += [
                f"{path.relative_to(REPO)} uses {name}"
                for name in ("__kwdefaults__", "__dict__[", "TaskIdentity", "momentum_vector", "_check_and_log_replies")
                if name in text
            ]
    assert offenders == []


def test_capped_sleep_caps_and_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    capped = fp.CappedSleep(0.2)
    capped.sleep(3)
    capped.sleep(0.05)
    assert slept == [0.2, 0.05]
    assert capped.monotonic is time.monotonic  # the rest of `time` is the module's
    with pytest.raises(ValueError, match="cap must be > 0"):
        fp.CappedSleep(0)


def test_supernode_loop_sleeps_capped(flower_state: None) -> None:
    assert fp.shorten_supernode_polls(0.1) is True
    assert isinstance(start_client_internal.time, fp.CappedSleep) and start_client_internal.time.cap == 0.1
    assert fp.shorten_supernode_polls(0.3) is True  # applied twice: replaced, not nested
    assert start_client_internal.time.cap == 0.3


def test_object_pull_retries_without_flowers_one_second_backoff(flower_state: None) -> None:
    misses = {"a": 2, "b": 3}

    def pull(object_id: str) -> bytes:
        if misses[object_id]:
            misses[object_id] -= 1
            raise ObjectUnavailableError(object_id)
        return object_id.encode()

    assert fp.shorten_object_pulls(0.01, 0.05) is True
    defaults = inflatable_utils.pull_objects.__kwdefaults__
    assert defaults["initial_backoff"] == 0.01 and defaults["backoff_cap"] == 0.05
    assert defaults["max_tries_per_object"] >= defaults["max_time"] / 0.05  # gives up no sooner than Flower would
    assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 0.01
    started = time.monotonic()
    assert inflatable_utils.pull_objects(["a", "b"], pull) == {"a": b"a", "b": b"b"}
    # Flower's own back-off (1 s, then 2 s, ±20 %) needs >= 2.4 s for three misses; ours ~0.1 s
    assert time.monotonic() - started < 1.0
    assert misses == {"a": 0, "b": 0}


def test_object_pull_arguments_checked(flower_state: None) -> None:
    with pytest.raises(ValueError, match="initial <= cap"):
        fp.shorten_object_pulls(1.0, 0.5)
    with pytest.raises(ValueError, match="0 < initial"):
        fp.shorten_object_pulls(0.0, 0.5)


def test_changed_flower_is_left_alone(
    flower_state: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(start_client_internal, "time", object())  # a Flower whose loop no longer sleeps via `time`
    monkeypatch.setattr(inflatable_utils.pull_objects, "__kwdefaults__", {"max_time": 10})
    assert fp.shorten_supernode_polls() is False
    assert fp.shorten_object_pulls() is False
    assert inflatable_utils.pull_objects.__kwdefaults__ == {"max_time": 10}
    assert len(fp.flower_internals_present()) == 2
    assert "left at Flower's back-off" in caplog.text and "stay at Flower's intervals" in caplog.text


def test_supernode_launcher_passes_flowers_flags(flower_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    flower_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the package re-exports the function
    seen: list[list[str]] = []
    monkeypatch.setattr(flower_cli, "flower_supernode", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["x"])
    flower_args = ["--superlink", "127.0.0.1:9092", "--insecure", "--isolation", "process"]
    assert supernode.main(["--idle-poll", "0.25", *flower_args]) == 0
    assert seen == [["flower-supernode", *flower_args]]
    assert start_client_internal.time.cap == 0.25
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == fp.PULL_BACKOFF_S
    with pytest.raises(SystemExit) as exit_info:
        supernode.main(["--idle-poll", "0", *flower_args])
    assert exit_info.value.code == 2


def test_warm_supernode_uses_the_launcher(tmp_path) -> None:
    warm = supernode.SuperNode("site1", tmp_path, "127.0.0.1:9092", 9094, tmp_path, None, None)
    cold = supernode.SuperNode("site1", tmp_path, "127.0.0.1:9092", 9094, tmp_path, None, None, warm=False)
    assert warm.argv()[1:3] == ["-m", "fedslide.client.supernode"] and "--isolation" in warm.argv()
    assert cold.argv()[0].endswith("flower-supernode") and "--isolation" not in cold.argv()
    hospital = supernode.SuperNode(
        "site1", tmp_path, "127.0.0.1:9092", 9094, tmp_path, None, None, isolation="subprocess"
    )
    assert hospital.argv()[-2:] == ["--isolation", "subprocess"]
    with pytest.raises(ValueError, match="isolation must be"):
        supernode.SuperNode("site1", tmp_path, "127.0.0.1:9092", 9094, tmp_path, None, None, isolation="thread")


# ---- the warm SuperExec in subprocess isolation (client.supernode.use_warm_superexec, flower_compat.start_superexec_through) --------------------------
@pytest.fixture
def flower_popen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's SuperNode module keeps its own `subprocess` after the test."""
    import subprocess

    monkeypatch.setattr(start_client_internal, "subprocess", subprocess)


def test_flowers_superexec_command_becomes_fedslides() -> None:
    import sys

    tls = [
        "flower-superexec",
        "--root-certificates",
        "/certs/ca.crt",
        "--runtime-api-address",
        "127.0.0.1:9094",
        "--parent-pid",
        "42",
    ]
    assert supernode.warm_superexec_command(tls, ["--site-dir", "/data/site"]) == [
        sys.executable,
        "-m",
        "fedslide.client.superexec",
        *tls[1:],
        "--site-dir",
        "/data/site",
    ]
    plain = ["/venv/bin/flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9094"]
    assert supernode.warm_superexec_command(plain)[3:] == plain[1:]
    # what fedslide's SuperExec cannot honour (it installs no dependencies), or another program: left alone
    assert supernode.warm_superexec_command([*plain, "--allow-runtime-dependency-installation"]) is None
    assert supernode.warm_superexec_command(["flower-superexec", "--runtime-api-address"]) is None
    assert supernode.warm_superexec_command(["flwr-clientapp", "--insecure"]) is None
    assert supernode.warm_superexec_command([]) is None


def test_the_supernode_launcher_swaps_in_the_warm_superexec(
    flower_state: None, flower_popen: None, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import importlib
    import subprocess
    import sys

    flower_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    monkeypatch.setattr(
        flower_cli, "flower_supernode", lambda: None
    )  # the real one: tests/test_federation_processes.py
    site = tmp_path / "site 1"
    flower_args = ["--superlink", "127.0.0.1:9092", "--insecure", "--node-config", f'site-dir="{site}" site-name="s1"']
    assert supernode.main(["--feature-memory-gb", "0.5", *flower_args]) == 0
    launcher = fp.superexec_popen()
    assert isinstance(launcher, supernode.WarmSuperExecLauncher)
    assert launcher.extra == ["--feature-memory-gb", "0.5", "--site-dir", str(site)]
    assert start_client_internal.subprocess.DEVNULL is subprocess.DEVNULL  # the rest of `subprocess` is the module's

    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda command, *a, **k: started.append(list(command)))
    # as Flower's SuperNode calls it
    start_client_internal.subprocess.Popen(
        ["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "7"]
    )
    with pytest.raises(PermissionError, match="allow-fab-code=true"):  # Flower's SuperExec: it runs the FAB's code
        start_client_internal.subprocess.Popen(
            ["flower-superexec", "--insecure", "--allow-runtime-dependency-installation"]
        )
    assert started == [
        [
            sys.executable,
            "-m",
            "fedslide.client.superexec",
            "--insecure",
            "--runtime-api-address",
            "127.0.0.1:9094",
            "--parent-pid",
            "7",
            "--feature-memory-gb",
            "0.5",
            "--site-dir",
            str(site),
        ],
    ]
    # Flower's own SuperExec (it runs the FAB's code) only where the node config allows FAB code; a SuperNode
    # without a site-dir holds no features
    monkeypatch.setattr(start_client_internal, "subprocess", subprocess)
    with pytest.raises(SystemExit):
        supernode.main(["--superexec", "flower", *flower_args])
    assert supernode.main(["--superexec", "flower", *flower_args[:-1], f"{flower_args[-1]} allow-fab-code=true"]) == 0
    assert start_client_internal.subprocess is subprocess
    assert supernode.main(["--superlink", "127.0.0.1:9092", "--insecure"]) == 0
    assert fp.superexec_popen().extra == ["--feature-memory-gb", "8"]
    with pytest.raises(SystemExit) as exit_info:
        supernode.main(["--feature-memory-gb", "-1", *flower_args])
    assert exit_info.value.code == 2


def test_a_flower_that_starts_its_superexec_otherwise_is_left_alone(
    flower_popen: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(start_client_internal, "subprocess", object())
    assert supernode.use_warm_superexec("/data/site", 8.0) is False
    assert "runs Flower's own" in caplog.text


def test_the_installed_flower_starts_its_superexec_as_the_launcher_expects() -> None:
    # a Flower upgrade that changes how the SuperNode starts `flower-superexec` would silently bring back a cold
    # process per message at every hospital: fail here instead
    import inspect
    import subprocess

    assert start_client_internal.subprocess is subprocess or isinstance(
        start_client_internal.subprocess, fp.PopenInstead
    )
    source = inspect.getsource(start_client_internal)
    assert 'command = ["flower-superexec"]' in source and "subprocess.Popen(command)" in source
