"""A hospital's Flower SuperNode process: connects out to the SuperLink; its ClientApp reads the site directory."""

from __future__ import annotations

import sys
from pathlib import Path

from common.processes import ManagedProcess, port_open
from server.superlink import flower_env, flower_tool


class SuperNode:
    """`flower-supernode` for one site (TLS with the consortium CA, authenticated by the site's key).

    `warm` (the default): the SuperNode runs with `--isolation process` next to fedslide's SuperExec
    (`client.superexec`), which runs each ClientApp message in a process forked from one that has imported torch
    and Flower already; otherwise Flower's own SuperExec starts a fresh `flwr-clientapp` per message.
    """

    def __init__(self, name: str, site_dir: Path, superlink: str, port: int, workdir: Path,
                 ca: Path | None, auth_key: Path | None, runs_dir: Path | None = None, env: dict[str, str] | None = None,
                 warm: bool = True):
        self.name, self.site_dir, self.superlink, self.port = name, Path(site_dir), superlink, port
        self.workdir, self.ca, self.auth_key, self.runs_dir, self.env = Path(workdir), ca, auth_key, runs_dir, env
        self.warm = warm
        self.process: ManagedProcess | None = None
        self.superexec: ManagedProcess | None = None

    @property
    def processes(self) -> list[ManagedProcess]:
        """The SuperNode and (warm) its SuperExec, as started."""
        return [p for p in (self.process, self.superexec) if p is not None]

    def node_config(self) -> str:
        """`--node-config` value: the site directory (read), where run outputs go, the site's name."""
        items = {"site-dir": str(self.site_dir.resolve()), "site-name": self.name}
        if self.runs_dir is not None:
            items["runs-dir"] = str(Path(self.runs_dir).resolve())
        return " ".join(f'{k}="{v}"' for k, v in items.items())

    def argv(self) -> list[str]:
        """The command line."""
        argv = [flower_tool("flower-supernode"), "--superlink", self.superlink, "--host", "127.0.0.1",
                "--port", str(self.port), "--node-config", self.node_config()]
        argv += ["--insecure"] if self.ca is None else ["--root-certificates", str(self.ca)]
        if self.auth_key is not None:
            argv += ["--auth-supernode-private-key", str(self.auth_key)]
        if self.warm:
            argv += ["--isolation", "process"]
        return argv

    def superexec_argv(self, parent_pid: int) -> list[str]:
        """The command line of the warm SuperExec (the Runtime API is the SuperNode's loopback port)."""
        return [sys.executable, "-m", "common.cli", "superexec", "--runtime-api-address", f"127.0.0.1:{self.port}",
                "--insecure", "--parent-pid", str(parent_pid)]

    def launch(self) -> "SuperNode":
        """Start the SuperNode process without waiting for it (several sites start side by side)."""
        self.process = ManagedProcess(f"SuperNode {self.name}", self.argv(), self.workdir / f"supernode-{self.name}.log",
                                      env=flower_env(self.env))
        return self

    def wait_ready(self, timeout: float = 60.0) -> "SuperNode":
        """Wait until its local port is up; then (warm) start its SuperExec."""
        assert self.process is not None, "launch() first"
        self.process.wait_ready(lambda: port_open("127.0.0.1", self.port), timeout)
        if self.warm:
            self.superexec = ManagedProcess(f"SuperExec {self.name}", self.superexec_argv(self.process.proc.pid),
                                            self.workdir / f"superexec-{self.name}.log", env=flower_env(self.env))
        return self

    def start(self, timeout: float = 60.0) -> "SuperNode":
        """Start (and, warm, its SuperExec) and wait until its local port is up."""
        return self.launch().wait_ready(timeout)

    def stop(self) -> None:
        for process in self.processes:  # the SuperNode first: its SuperExec then stops on its own or is stopped
            process.stop()
