"""The coordinating site's Flower SuperLink process and the `flwr` CLI that submits and watches runs."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedslide.common.flower_env import flower_env, flower_tool
from fedslide.common.processes import ManagedProcess, ProcessFailed, port_open


@dataclass(frozen=True)
class TLSFiles:
    """CA certificate, and (server side) the certificate and key to present."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


class SuperLink:
    """`flower-superlink` on host:port (one port carries Fleet, Control and Runtime APIs in flwr ≥ 1.41).

    TLS unless `tls` is None (insecure, for explicit opt-in only); SuperNode authentication on by
    default; runtime dependency installation off (dependencies are installed at every host). `fresh=False`
    keeps the database of an earlier start (registered keys, hence node ids: what a resumed run needs);
    `in_memory` keeps no database file at all (Flower's in-memory state and object store).
    """

    def __init__(
        self,
        workdir: Path,
        tls: TLSFiles | None,
        host: str = "127.0.0.1",
        port: int = 9092,
        node_auth: bool = True,
        env: dict[str, str] | None = None,
        fresh: bool = True,
        in_memory: bool = False,
    ):
        self.workdir = Path(workdir)
        self.host, self.port, self.tls, self.node_auth = host, port, tls, node_auth
        self.env, self.fresh, self.in_memory = env, fresh, in_memory
        self.process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        """The command line."""
        argv = [
            flower_tool("flower-superlink"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if not self.in_memory:
            argv += ["--database", str(self.workdir / "state.db")]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += [
                "--ssl-ca-certfile",
                str(self.tls.ca),
                "--ssl-certfile",
                str(self.tls.cert),
                "--ssl-keyfile",
                str(self.tls.key),
            ]
        if self.node_auth:
            argv.append("--enable-supernode-auth")
        return argv

    def start(self, timeout: float = 60.0) -> "SuperLink":
        """Start and wait until the port accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.fresh:
            (self.workdir / "state.db").unlink(missing_ok=True)  # a fresh link: stale nodes would look online
        self.process = ManagedProcess(
            "SuperLink", self.argv(), self.workdir / "superlink.log", env=flower_env(self.env)
        )
        self.process.wait_ready(lambda: port_open(self.host, self.port), timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class FlowerCliError(ProcessFailed):
    """A `flwr` command failed; the message has its output."""


class FlowerCli:
    """`flwr` against one SuperLink, with a private FLWR_HOME holding the connection (address + CA)."""

    def __init__(self, home: Path, address: str, ca: Path | None, connection: str = "fedslide"):
        self.home = Path(home)
        self.connection = connection
        self.home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{Path(ca).resolve()}"' if ca is not None else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\naddress = "{address}"\n{security}\n'
        )

    def env(self) -> dict[str, str]:
        return {**flower_env(), "FLWR_HOME": str(self.home)}

    def call(self, *args: str, timeout: float = 120.0, parse: bool = True) -> Any:
        """Run `flwr ARGS`; the parsed JSON (parse) or the text output."""
        argv = [flower_tool("flwr"), *args]
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env(), timeout=timeout)
        out = done.stdout.strip()
        if not parse:
            return out + done.stderr
        try:
            data = json.loads(out[out.index("{") :]) if "{" in out else {}
        except ValueError:
            data = {}
        if done.returncode != 0 or not data.get("success", False):
            reason = str(data.get("error-message", "")).strip() or "see its output"
            raise FlowerCliError(
                f"`flwr {' '.join(args)}` failed (exit {done.returncode}): {reason}\n{out}\n{done.stderr[-2000:]}"
            )
        return data

    def register(self, public_key: Path) -> str:
        """Register a site's public key (SuperNode authentication); its node id."""
        return str(self.call("supernode", "register", str(public_key), self.connection, "--format", "json")["node-id"])

    def submit(self, app_dir: Path, run_config: Path) -> int:
        """`flwr run APP --run-config FILE`; the Flower run id."""
        data = self.call("run", str(app_dir), self.connection, "--run-config", str(run_config), "--format", "json")
        return int(data["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        """The run's entry of `flwr ls --run-id`."""
        return dict(self.call("ls", self.connection, "--run-id", str(run_id), "--format", "json")["runs"][0])

    def stream_logs(self, run_id: int, path: Path) -> ManagedProcess:
        """`flwr log RUN_ID --stream`, written to `path`: the ServerApp's log as it is written. One process for the
        whole run; it exits when the SuperLink sees the run finished (or when the stream breaks)."""
        return ManagedProcess(
            f"log stream of run {run_id}",
            [flower_tool("flwr"), "log", str(run_id), self.connection, "--stream"],
            path,
            env=self.env(),
        )

    def logs(self, run_id: int) -> str:
        """The ServerApp's log so far."""
        return str(self.call("log", str(run_id), self.connection, "--show", parse=False, timeout=60))

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (best effort)."""
        try:
            self.call("stop", str(run_id), self.connection, "--format", "json", timeout=30)
        except (FlowerCliError, subprocess.TimeoutExpired):
            pass
