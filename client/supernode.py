"""A hospital's Flower SuperNode process: connects out to the SuperLink; its ClientApp reads the site directory."""

from __future__ import annotations

from pathlib import Path

from common.processes import ManagedProcess, port_open
from server.superlink import flower_env, flower_tool


class SuperNode:
    """`flower-supernode` for one site (TLS with the consortium CA, authenticated by the site's key)."""

    def __init__(self, name: str, site_dir: Path, superlink: str, port: int, workdir: Path,
                 ca: Path | None, auth_key: Path | None, runs_dir: Path | None = None, env: dict[str, str] | None = None):
        self.name, self.site_dir, self.superlink, self.port = name, Path(site_dir), superlink, port
        self.workdir, self.ca, self.auth_key, self.runs_dir, self.env = Path(workdir), ca, auth_key, runs_dir, env
        self.process: ManagedProcess | None = None

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
        return argv

    def start(self, timeout: float = 60.0) -> "SuperNode":
        """Start and wait until its local port is up."""
        self.process = ManagedProcess(f"SuperNode {self.name}", self.argv(), self.workdir / f"supernode-{self.name}.log",
                                      env=flower_env(self.env))
        self.process.wait_ready(lambda: port_open("127.0.0.1", self.port), timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
