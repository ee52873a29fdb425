"""A hospital's Flower SuperNode process: connects out to the SuperLink; its ClientApp reads the site directory.

`python -m fedslide.client.supernode [--idle-poll S] [--superexec fedslide|flower] FLOWER-SUPERNODE-ARGS...`
(installed as `fedslide-supernode`) is Flower's `flower-supernode`, same flags, with shorter polling
(`common.flower_compat`): it asks the SuperLink for work every `--idle-poll` s instead of every 3 s and pulls a
message's arrays without Flower's 1 s back-off. In Flower's default `subprocess` isolation the SuperExec it
starts is fedslide's warm one (`client.superexec`, holding the node config's `site-dir` features) instead of
`flower-superexec`; it runs the site's installed ClientApp and refuses a FAB that is not the installed fedslide
(node config `allowed-fab-hashes` pins reviewed builds). Node config `allow-fab-code=true` (development only) runs the
FAB's code instead, and is required for `--superexec flower` (Flower's SuperExec always runs the FAB's code).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedslide.common import flower_compat
from fedslide.common.flower_app import ALLOW_FAB_CODE
from fedslide.common.flower_env import flower_env, flower_tool
from fedslide.common.processes import ManagedProcess, port_open

log = logging.getLogger(__name__)

# what Flower's SuperNode passes to the `flower-superexec` it starts in subprocess isolation (flwr 1.42), all of which
# `fedslide superexec` takes too; with anything else the command is left as Flower wrote it
_FLAGS_WITH_VALUE = frozenset({"--runtime-api-address", "--parent-pid", "--root-certificates"})
_FLAGS = frozenset({"--insecure"})


class SuperNode:
    """`flower-supernode` for one site (TLS with the consortium CA, authenticated by the site's key).

    `warm` (the default): the SuperNode polls briefly (`main` below) and runs with `--isolation process` next to
    fedslide's SuperExec (`client.superexec`), which runs each ClientApp message in a process forked from one that
    has imported torch and Flower already; with `isolation="subprocess"` the SuperNode starts that SuperExec itself.
    Otherwise it is Flower's `flower-supernode` as shipped, and Flower's own SuperExec starts a fresh
    `flwr-clientapp` per message.
    """

    def __init__(
        self,
        name: str,
        site_dir: Path,
        superlink: str,
        port: int,
        workdir: Path,
        ca: Path | None,
        auth_key: Path | None,
        runs_dir: Path | None = None,
        env: dict[str, str] | None = None,
        warm: bool = True,
        isolation: str = "process",
        allow_fab_code: bool = False,
        node_options: dict[str, str] | None = None,
    ):
        if isolation not in ("process", "subprocess"):
            raise ValueError(f"isolation must be 'process' or 'subprocess', got {isolation!r}")
        self.name, self.site_dir, self.superlink, self.port = name, Path(site_dir), superlink, port
        self.workdir, self.ca, self.auth_key, self.runs_dir, self.env = Path(workdir), ca, auth_key, runs_dir, env
        self.warm = warm
        # warm only: "process" = the SuperExec is a process of our own beside the SuperNode (watched by the caller);
        # "subprocess" = the SuperNode starts it, as a hospital's `fedslide-supernode` or the site image does
        self.isolation = isolation
        self.allow_fab_code = allow_fab_code  # node config allow-fab-code: the site runs the FAB's code (development)
        self.node_options = dict(node_options or {})  # more node config (e.g. allowed-fab-hashes)
        self.process: ManagedProcess | None = None
        self.superexec: ManagedProcess | None = None

    @property
    def processes(self) -> list[ManagedProcess]:
        """The SuperNode and (warm) its SuperExec, as started."""
        return [p for p in (self.process, self.superexec) if p is not None]

    def node_config(self) -> str:
        """`--node-config` value: the site directory (read), where run outputs go, the site's name, whether the
        FAB's code may run, and `node_options`."""
        items = {"site-dir": str(self.site_dir.resolve()), "site-name": self.name, **self.node_options}
        if self.runs_dir is not None:
            items["runs-dir"] = str(Path(self.runs_dir).resolve())
        text = " ".join(f'{k}="{v}"' for k, v in items.items())
        return f"{text} {ALLOW_FAB_CODE}=true" if self.allow_fab_code else text

    def argv(self) -> list[str]:
        """The command line (warm: fedslide's short-polling launcher of Flower's SuperNode)."""
        launcher = (
            [sys.executable, "-m", "fedslide.client.supernode"] if self.warm else [flower_tool("flower-supernode")]
        )
        argv = [
            *launcher,
            "--superlink",
            self.superlink,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--node-config",
            self.node_config(),
        ]
        argv += ["--insecure"] if self.ca is None else ["--root-certificates", str(self.ca)]
        if self.auth_key is not None:
            argv += ["--auth-supernode-private-key", str(self.auth_key)]
        if self.warm:
            argv += ["--isolation", self.isolation]
        return argv

    def superexec_argv(self, parent_pid: int) -> list[str]:
        """The command line of the warm SuperExec (the Runtime API is the SuperNode's loopback port)."""
        return [
            sys.executable,
            "-m",
            "fedslide.client.superexec",
            "--runtime-api-address",
            f"127.0.0.1:{self.port}",
            "--insecure",
            "--parent-pid",
            str(parent_pid),
            "--site-dir",
            str(self.site_dir.resolve()),
            *(["--allow-fab-code"] if self.allow_fab_code else []),
        ]

    def launch(self) -> "SuperNode":
        """Start the SuperNode process and (warm) its SuperExec without waiting (several sites start side by side;
        the SuperExec preloads torch meanwhile and waits for the SuperNode's port itself)."""
        self.process = ManagedProcess(
            f"SuperNode {self.name}", self.argv(), self.workdir / f"supernode-{self.name}.log", env=flower_env(self.env)
        )
        if self.warm and self.isolation == "process":
            self.superexec = ManagedProcess(
                f"SuperExec {self.name}",
                self.superexec_argv(self.process.proc.pid),
                self.workdir / f"superexec-{self.name}.log",
                env=flower_env(self.env),
            )
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


def warm_superexec_command(command: Sequence[str], extra: Sequence[str] = ()) -> list[str] | None:
    """`fedslide superexec` in place of the `flower-superexec` command line Flower's SuperNode runs (its flags, then
    `extra`); None when the command is another one or carries a flag fedslide's SuperExec does not take (for
    example `--allow-runtime-dependency-installation`: it installs nothing)."""
    if not command or Path(command[0]).name != "flower-superexec":
        return None
    args = list(command[1:])
    i = 0
    while i < len(args):
        if args[i] in _FLAGS_WITH_VALUE and i + 1 < len(args):
            i += 2
        elif args[i] in _FLAGS:
            i += 1
        else:
            return None
    return [sys.executable, "-m", "fedslide.client.superexec", *args, *extra]


class WarmSuperExecLauncher:
    """Flower's SuperNode calls this in place of `subprocess.Popen`: the `flower-superexec` it starts in subprocess
    isolation becomes `fedslide superexec` with the same flags (see `warm_superexec_command`). A command it cannot
    replace (Flower's SuperExec runs the FAB's code) is started as written only with `allow_fab_code`."""

    def __init__(self, extra: Sequence[str] = (), allow_fab_code: bool = False) -> None:
        self.extra = list(extra)
        self.allow_fab_code = allow_fab_code

    def __call__(self, command: Sequence[str], *args: Any, **kwargs: Any) -> subprocess.Popen:
        warm = warm_superexec_command(command, self.extra)
        if warm is None and not self.allow_fab_code:
            raise PermissionError(
                f"not starting {' '.join(command)}: only fedslide's SuperExec runs this site's installed code (Flower's "
                f"runs the FAB's); set {ALLOW_FAB_CODE}=true in --node-config to allow it (development only)"
            )
        if warm is None:
            log.warning(
                "starting %s as Flower wrote it, not fedslide's SuperExec: %s",
                command[0] if command else "?",
                " ".join(command),
            )
        return subprocess.Popen(warm or list(command), *args, **kwargs)


def use_warm_superexec(site_dir: str | None, feature_memory_gb: float, allow_fab_code: bool = False) -> bool:
    """Make this process's SuperNode start fedslide's SuperExec in subprocess isolation (holding `site_dir`'s
    feature files, up to `feature_memory_gb`; running the FAB's code only with `allow_fab_code`); whether it
    applied."""
    extra = ["--feature-memory-gb", f"{feature_memory_gb:g}"]
    if site_dir:
        extra += ["--site-dir", str(site_dir)]
    if allow_fab_code:
        extra.append("--allow-fab-code")
    return flower_compat.start_superexec_through(WarmSuperExecLauncher(extra, allow_fab_code))


def node_config_of(flower_args: Sequence[str]) -> dict[str, Any]:
    """The `--node-config` among Flower's SuperNode flags, parsed as Flower does (empty without one)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--node-config", default=None)
    known, _ = parser.parse_known_args(list(flower_args))
    return dict(flower_compat.parse_config_args([known.node_config])) if known.node_config else {}


def node_config_site_dir(flower_args: Sequence[str]) -> str | None:
    """The `site-dir` of a `--node-config` among Flower's SuperNode flags, if any."""
    value = node_config_of(flower_args).get("site-dir")
    return None if value in (None, "") else str(value)


def node_config_allows_fab_code(flower_args: Sequence[str]) -> bool:
    """Whether the `--node-config` sets `allow-fab-code=true` (a TOML boolean; ValueError for anything else)."""
    value = node_config_of(flower_args).get(ALLOW_FAB_CODE, False)
    if not isinstance(value, bool):
        raise ValueError(f"node config {ALLOW_FAB_CODE} must be true or false (unquoted), got {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Flower's SuperNode with fedslide's shorter polls and (subprocess isolation) warm SuperExec; every argument but
    ours goes to `flower-supernode`."""
    from fedslide.client.superexec import FEATURE_MEMORY_GB
    from fedslide.common.flower_compat import IDLE_POLL_S, PULL_BACKOFF_CAP_S, PULL_BACKOFF_S

    parser = argparse.ArgumentParser(
        prog="fedslide-supernode",
        description="flower-supernode with shorter polling and, in its default subprocess "
        "isolation, fedslide's warm SuperExec; other flags are Flower's (see flower-supernode --help)",
    )
    parser.add_argument(
        "--idle-poll",
        type=float,
        default=IDLE_POLL_S,
        help=f"seconds between polls for a message or a reply (Flower: 3 s / 0.5 s; default {IDLE_POLL_S})",
    )
    parser.add_argument(
        "--pull-backoff",
        type=float,
        default=PULL_BACKOFF_S,
        help=f"first wait before pulling a missing array again (Flower: 1 s; default {PULL_BACKOFF_S})",
    )
    parser.add_argument(
        "--superexec",
        choices=("fedslide", "flower"),
        default="fedslide",
        help="the SuperExec started in subprocess isolation: fedslide's (each message in a process "
        "forked from one that imported torch once, running the installed ClientApp; default) or Flower's (a fresh "
        "flwr-clientapp per message, running the FAB's code: needs node config allow-fab-code=true). With "
        "--isolation process neither is started here.",
    )
    parser.add_argument(
        "--feature-memory-gb",
        type=float,
        default=FEATURE_MEMORY_GB,
        help="fedslide's SuperExec holds the site-dir's feature files up to this many GiB "
        f"(default {FEATURE_MEMORY_GB:g}; 0: none)",
    )
    ours, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for name in ("idle_poll", "pull_backoff"):
        if not getattr(ours, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(ours, name)!r}")
    if ours.feature_memory_gb < 0:
        parser.error(f"--feature-memory-gb must be >= 0, got {ours.feature_memory_gb!r}")
    try:
        allow_fab_code = node_config_allows_fab_code(flower_args)
    except ValueError as exc:
        parser.error(str(exc))
    flowers = "--superexec flower" if ours.superexec == "flower" else None
    if "--allow-runtime-dependency-installation" in flower_args:  # only Flower's SuperExec installs dependencies
        flowers = "--allow-runtime-dependency-installation (Flower's SuperExec)"
    if flowers and not allow_fab_code:
        parser.error(
            f"{flowers} runs the ClientApp code of the FAB the coordinator sends, not this site's installed "
            f"fedslide: add {ALLOW_FAB_CODE}=true to --node-config to allow that (development only)"
        )
    if allow_fab_code:
        log.warning("node config %s=true: this site runs the FAB's code (development only)", ALLOW_FAB_CODE)
    flower_compat.shorten_supernode_polls(ours.idle_poll)
    flower_compat.shorten_object_pulls(ours.pull_backoff, max(ours.pull_backoff, PULL_BACKOFF_CAP_S))
    if ours.superexec == "fedslide":
        use_warm_superexec(node_config_site_dir(flower_args), ours.feature_memory_gb, allow_fab_code)

    flower_compat.update_console_handler(timestamps=True, colored=False)  # its log is a file: when, not colours
    sys.argv = ["flower-supernode", *flower_args]
    flower_compat.flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
