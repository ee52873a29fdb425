"""A throwaway single-node Ray cluster on loopback for tests and benchmarks (`ray start --head --block`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

# Ray resolves 127.0.0.1 to the machine's outward address unless told that this is not a multi-node cluster
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_processes(sid: int) -> list[psutil.Process]:
    """The processes of the session the head was started in (every Ray daemon and worker it spawned)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


@contextmanager
def local_ray_head(num_cpus: int, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Start a Ray head on 127.0.0.1 in its own session, yield its address, stop exactly its processes after.

    The caller's process must have LOOPBACK_ENV set too (the driver then looks for the raylet on loopback).
    """
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    env = {**os.environ, **LOOPBACK_ENV, "OMP_NUM_THREADS": "1"}
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port)]
    cmd += ["--num-cpus", str(num_cpus), "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats"]
    cmd += ["--object-store-memory", str(100 * 2**20), "--temp-dir", str(temp_dir)]
    log = open(temp_dir / "head.log", "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while b"Ray runtime started" not in (temp_dir / "head.log").read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start: {(temp_dir / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield address
    finally:
        procs = _session_processes(head.pid)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
