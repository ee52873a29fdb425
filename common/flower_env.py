"""Flower's executables and the environment fedslide starts them with (SuperLink, SuperNodes, SuperExecs, `flwr`).

Flower's processes report usage to Flower's telemetry service and ask Flower's servers for updates unless told
not to; neither may leave a hospital, so every Flower process fedslide starts runs with both switched off
(`QUIET_FLOWER`, as in the deployment's containers).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = 0.2
# what Flower would otherwise send out of the site: usage events (telemetry) and version queries (update check)
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_tool(name: str) -> str:
    """Path of a Flower executable: next to this Python first (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH (pip install flwr)")
    return found


def flower_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a Flower process: this Python's Flower tools first on PATH, telemetry and update checks off.

    SuperLink and SuperNode start `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name, so
    without the PATH entry a venv that is not activated fails (or another installation's tools run). Their
    SuperExec looks for a new task every `SUPEREXEC_POLL_S` (Flower's default: 1 s, paid on every message),
    unless the environment already sets FLWR_SUPEREXEC_TASK_POLL_INTERVAL. `QUIET_FLOWER` overrides whatever
    the environment says: nothing but the federation's own messages leaves a site.
    """
    out = dict(os.environ if env is None else env)
    out["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), out.get("PATH", "")])
    out.setdefault(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL_S))
    out.update(QUIET_FLOWER)
    return out
