"""The coordinating site's Flower ServerApp: runs the federation and writes runs/<run_id>/."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedslide.common.config.federation import FederationConfig
from fedslide.common.flower_compat import shorten_object_pulls, update_console_handler
from fedslide.server.outputs import write_outputs
from fedslide.server.protocol import RunResult, run_federation

log = logging.getLogger(__name__)

app = ServerApp()


def run_dir_of(cfg: FederationConfig) -> Path:
    """`<runs-dir>/<run-id>` (absolute: the ServerApp's working directory is not the app's)."""
    runs = Path(cfg.runs_dir or "runs").expanduser().resolve()
    run_id = cfg.run_id or time.strftime("run-%Y%m%d-%H%M%S")
    return runs / run_id


def run(grid: Grid, cfg: FederationConfig) -> RunResult:
    """Run or resume the federation and write its outputs."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = run_federation(grid, cfg, run_dir)
    metrics = write_outputs(result, time.perf_counter() - start)
    log.info("run %s done: %s", run_dir, {r["model"]: r["auc"] for r in metrics["rows"]})
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point (its process pulls the sites' replies without Flower's 1 s back-off)."""
    shorten_object_pulls()
    update_console_handler(timestamps=True)
    run(grid, FederationConfig.from_run_config(dict(context.run_config)))
