"""ManagedProcess: stopping a child also stops what it detached or orphaned (real processes, no mocks)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil

from fedslide.common.processes import ManagedProcess

# A parent that starts a child in a new session (as Flower's SuperLink starts SuperExec), prints its pid, waits.
DETACHING_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def _child_pid(log: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text().strip() if log.is_file() else ""
        if text:
            return int(text.splitlines()[0])
        time.sleep(0.1)
    raise AssertionError(f"the parent never printed its child's pid; log: {log}")


def _start(tmp_path: Path) -> tuple[ManagedProcess, psutil.Process]:
    proc = ManagedProcess("parent", [sys.executable, "-c", DETACHING_PARENT], tmp_path / "parent.log")
    child = psutil.Process(_child_pid(tmp_path / "parent.log"))
    assert os.getpgid(child.pid) != proc.proc.pid  # really outside the parent's process group
    assert proc.alive  # noting the family
    return proc, child


def test_stop_ends_a_detached_child(tmp_path: Path) -> None:
    proc, child = _start(tmp_path)
    proc.stop(timeout=5)
    assert not proc.alive
    assert psutil.wait_procs([child], timeout=10)[1] == []


def test_stop_ends_the_orphans_of_a_parent_that_was_killed(tmp_path: Path) -> None:
    proc, child = _start(tmp_path)
    os.killpg(proc.proc.pid, signal.SIGKILL)  # the parent crashes; its detached child is orphaned
    proc.proc.wait(10)
    assert child.is_running()
    proc.stop(timeout=5)
    assert psutil.wait_procs([child], timeout=10)[1] == []


def test_stop_leaves_other_processes_alone(tmp_path: Path) -> None:
    proc, child = _start(tmp_path)
    child.kill()  # a remembered child already gone (a zombie until its parent goes)
    bystander = psutil.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc.stop(timeout=5)
        assert bystander.is_running()  # not ours: remembered by pid and start time
        assert psutil.wait_procs([child], timeout=10)[1] == []
    finally:
        bystander.kill()
        bystander.wait(10)
