"""Child processes the product starts (SuperLink, SuperNodes): logged to a file, stopped for sure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil


class ProcessFailed(RuntimeError):
    """A child process exited early or never became ready; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """Something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file (empty when absent)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _running(proc: psutil.Process) -> bool:
    """Still running and not a zombie (is_running() also checks the create time: a reused pid is not ours)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ManagedProcess:
    """A child process in its own process group, output to `log`; `stop()` ends it (TERM, then KILL).

    Descendants seen while it runs are remembered, so `stop()` also ends those that left its process group
    (Flower's SuperLink detaches its SuperExec, whose ServerApp retries a dead SuperLink for ever) or that
    outlived it (orphans of a crashed parent). They are looked up at most every `family_every` s when `alive` is
    asked (a scan of every process on the host, ≈ 10 ms), and always by `stop()`.
    """

    family_every = 5.0

    def __init__(
        self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ):
        self.name = name
        self.argv = list(argv)
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
        finally:
            handle.close()
        self._family: dict[tuple[int, float], psutil.Process] = {}
        self._family_at = float("-inf")

    @property
    def alive(self) -> bool:
        """Still running (and, every `family_every` s, its descendants noted for `stop()`)."""
        running = self.proc.poll() is None
        if running and time.monotonic() - self._family_at >= self.family_every:
            self._remember_family()
        return running

    def _remember_family(self) -> None:
        self._family_at = time.monotonic()
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        for child in family:
            try:
                self._family.setdefault((child.pid, child.create_time()), child)
            except psutil.Error:
                continue

    def failure(self, what: str) -> ProcessFailed:
        """An error naming this process, its exit status and its log tail."""
        status = "running" if self.alive else f"exit status {self.proc.returncode}"
        return ProcessFailed(f"{self.name} {what} ({status}); last lines of {self.log}:\n{tail(self.log)}")

    def wait_ready(self, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        """Poll `ready` until true; raise with the log tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise self.failure("exited during start-up")
            if ready():
                return
            time.sleep(0.5)
        raise self.failure(f"not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left; then the same for remembered descendants."""
        if self.proc.poll() is None:
            self._remember_family()
            self._stop_group(timeout)
        self._stop_family(timeout)

    def _stop_group(self, timeout: float) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _stop_family(self, timeout: float) -> None:
        left = [p for p in self._family.values() if _running(p)]
        for proc in left:
            try:
                proc.terminate()
            except psutil.Error:
                continue
        _, stubborn = psutil.wait_procs(left, timeout=timeout)
        for proc in stubborn:
            try:
                proc.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(stubborn, timeout=5.0)
