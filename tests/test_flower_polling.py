"""Shorter polling in Flower's SuperNode loop and object pulls (`common.flower_polling`, `client.supernode.main`).

Flower's real functions are called; each test restores the Flower state it changes (monkeypatch). The SuperNode
itself is replaced by a recorder only in the argument test: the real one runs in tests/test_federation_processes.py.
"""

from __future__ import annotations

import time

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supernode import start_client_internal

from client import supernode
from common import flower_polling as fp


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


def test_changed_flower_is_left_alone(flower_state: None, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
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
    assert warm.argv()[1:3] == ["-m", "client.supernode"] and "--isolation" in warm.argv()
    assert cold.argv()[0].endswith("flower-supernode") and "--isolation" not in cold.argv()
