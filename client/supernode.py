"""A hospital's Flower SuperNode process: connects out to the SuperLink; its ClientApp reads the site directory.

`python -m client.supernode [--idle-poll S] FLOWER-SUPERNODE-ARGS...` (installed as `fedslide-supernode`) is
Flower's `flower-supernode`, same flags, with shorter polling (`common.flower_polling`): it asks the SuperLink
for work every `--idle-poll` s instead of every 3 s and pulls a message's arrays without Flower's 1 s back-off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.flower_env import flower_env, flower_tool
from common.processes import ManagedProcess, port_open


class SuperNode:
    """`flower-supernode` for one site (TLS with the consortium CA, authenticated by the site's key).

    `warm` (the default): the SuperNode polls briefly (`main` below) and runs with `--isolation process` next to
    fedslide's SuperExec (`client.superexec`), which runs each ClientApp message in a process forked from one that
    has imported torch and Flower already. Otherwise it is Flower's `flower-supernode` as shipped, and Flower's
    own SuperExec starts a fresh `flwr-clientapp` per message.
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
        """The command line (warm: fedslide's short-polling launcher of Flower's SuperNode)."""
        launcher = [sys.executable, "-m", "client.supernode"] if self.warm else [flower_tool("flower-supernode")]
        argv = [*launcher, "--superlink", self.superlink, "--host", "127.0.0.1",
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
                "--insecure", "--parent-pid", str(parent_pid), "--site-dir", str(self.site_dir.resolve())]

    def launch(self) -> "SuperNode":
        """Start the SuperNode process and (warm) its SuperExec without waiting (several sites start side by side;
        the SuperExec preloads torch meanwhile and waits for the SuperNode's port itself)."""
        self.process = ManagedProcess(f"SuperNode {self.name}", self.argv(), self.workdir / f"supernode-{self.name}.log",
                                      env=flower_env(self.env))
        if self.warm:
            self.superexec = ManagedProcess(f"SuperExec {self.name}", self.superexec_argv(self.process.proc.pid),
                                            self.workdir / f"superexec-{self.name}.log", env=flower_env(self.env))
        return self

    def wait_ready(self, timeout: float = 60.0) -> "SuperNode":
        """Wait until its local port is up (a SuperExec that died meanwhile is reported)."""
        assert self.process is not None, "launch() first"
        self.process.wait_ready(lambda: port_open("127.0.0.1", self.port), timeout)
        if self.superexec is not None and not self.superexec.alive:
            raise self.superexec.failure("exited during start-up")
        return self

    def start(self, timeout: float = 60.0) -> "SuperNode":
        """Start (and, warm, its SuperExec) and wait until its local port is up."""
        return self.launch().wait_ready(timeout)

    def stop(self) -> None:
        """Stop the SuperNode, then its SuperExec."""
        for process in self.processes:  # the SuperNode first: its SuperExec then stops on its own or is stopped
            process.stop()


def main(argv: list[str] | None = None) -> int:
    """Flower's SuperNode with fedslide's shorter polls; every argument but ours goes to `flower-supernode`."""
    from common.flower_polling import (IDLE_POLL_S, PULL_BACKOFF_CAP_S, PULL_BACKOFF_S, shorten_object_pulls,
                                       shorten_supernode_polls)

    parser = argparse.ArgumentParser(
        prog="fedslide-supernode", description="flower-supernode with shorter polling; other flags are Flower's "
        "(see flower-supernode --help)")
    parser.add_argument("--idle-poll", type=float, default=IDLE_POLL_S,
                        help=f"seconds between polls for a message or a reply (Flower: 3 s / 0.5 s; default {IDLE_POLL_S})")
    parser.add_argument("--pull-backoff", type=float, default=PULL_BACKOFF_S,
                        help=f"first wait before pulling a missing array again (Flower: 1 s; default {PULL_BACKOFF_S})")
    ours, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for name in ("idle_poll", "pull_backoff"):
        if not getattr(ours, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(ours, name)!r}")
    shorten_supernode_polls(ours.idle_poll)
    shorten_object_pulls(ours.pull_backoff, max(ours.pull_backoff, PULL_BACKOFF_CAP_S))

    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    update_console_handler(timestamps=True, colored=False)  # its log is a file: when, not colours
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
