"""Federated vs centralized pixel-level LRMIL stage 1 wall time on the same small cohort (issue 31).

    OMP_NUM_THREADS=1 python tests/bench/bench_federated_stage1.py --out /tmp/s1bench [--sites 2]
        [--slides-per-site 6] [--rounds 2] [--local-epochs 1] [--max-patches 8] [--trainable last-n] [--last-n 1]
        [--threads 1] [--json OUT.json]

Run on demand (not collected by pytest). Writes a synthetic cohort (`fedslide synth`) and preprocesses it once
(reused on a rerun), then times, on the same sampled patches (same finetune settings and seed) and the same
number of passes over them (rounds x local epochs):
- centralized: `fedslide finetune`'s `run_site` at each site in turn (fine-tune + re-encode), summed;
- federated: the handshake and the pixel-stage-1 step of `server.protocol` through the in-process LocalGrid
  (init query, R FedAvg rounds with each site's validation pass, the last round's validation, re-encoding), i.e.
  the real ServerApp/ClientApp code without processes or network. The sites run one after the other here, as
  the centralized sites do.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedslide.client.client_app import app as client_app
from fedslide.client.lowres_finetune import run_site
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.finetune import FinetuneConfig
from fedslide.deploy.cli import main as cli
from fedslide.server.checkpoint import Checkpoint
from fedslide.server.grid import FederationGrid
from fedslide.server.local_grid import LocalGrid
from fedslide.server.protocol import Federation, RunModels, handshake, pixel_stage1_step
from fedslide.server.strategies import UpdateValidator


def cohort(out: Path, sites: int, slides: int) -> list[Path]:
    root = out / "cohort"
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        argv = ["synth", "--out", str(root), "--sites", str(sites), "--slides-per-site", str(slides), "--no-progress"]
        assert cli([*argv, "--seed", "5", "--set", "slide-size-um=[900.0, 1100.0]"]) == 0
        for site in sorted(d for d in root.iterdir() if d.is_dir()):
            assert (
                cli(["preprocess", "--site", str(site), "--no-progress", "--batch-size", "16", "--workers", "0"]) == 0
            )
        (root / "done").write_text("ok\n")
    return sorted(d for d in root.iterdir() if d.is_dir())


def finetune_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "trainable": args.trainable,
        "last_n": args.last_n,
        "batch_size": args.batch,
        "max_patches": args.max_patches,
        "lr": 1e-3,
        "encoder": {"device": "cpu", "batch_size": 16, "num_workers": 0, "threads": args.threads},
    }


def centralized(sites: list[Path], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    per_site = {}
    for site in sites:
        for folder in (site / "features").glob("efficientnet_lite0-ft-*"):  # re-encoding is timed afresh
            shutil.rmtree(folder, ignore_errors=True)
        cfg = FinetuneConfig.model_validate(
            {
                **finetune_settings(args),
                "epochs": args.rounds * args.local_epochs,
                "progress": False,
                "overwrite": True,
                "output": str(out / "central" / site.name),
            }
        )
        start = time.perf_counter()
        result, reencoded = run_site(site, cfg)
        per_site[site.name] = {
            "seconds": time.perf_counter() - start,
            "patches": result.patches,
            "finetune_seconds": result.seconds,
            "reencode_seconds": reencoded.seconds if reencoded else 0.0,
        }
    return {"seconds": sum(s["seconds"] for s in per_site.values()), "sites": per_site}


def federated(sites: list[Path], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    for site in sites:
        for folder in (site / "features").glob("efficientnet_lite0-ft-*"):  # re-encoding is timed afresh
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(site / "runs" / "bench-s1", ignore_errors=True)
    run_dir = out / "fed" / "bench-s1"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = FederationConfig(
        run_id="bench-s1",
        runs_dir=out / "fed",
        pixel_stage1=True,
        device="cpu",
        threads=args.threads,
        min_nodes=len(sites),
        finetune=finetune_settings(args),
        rounds={"pixel_stage1": args.rounds, "pixel_stage1_local_epochs": args.local_epochs},
    )
    grid = LocalGrid(client_app, [{"site-dir": str(s)} for s in sites], cfg.to_run_config())
    start = time.perf_counter()
    fed = Federation(cfg, FederationGrid(grid), run_dir, Checkpoint(run_dir), UpdateValidator())
    handshake(fed)
    pixel_stage1_step(fed, RunModels(None, None, False))  # type: ignore[arg-type]  # stage 1 reads no MIL config
    seconds = time.perf_counter() - start
    state = Checkpoint(run_dir).state["phases"]
    return {
        "seconds": seconds,
        "rounds_seconds": state["pixel-stage1"]["seconds"],
        "reencode_seconds": state["pixel-stage1-reencode"]["seconds"],
        "history": state["pixel-stage1"]["history"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--slides-per-site", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--max-patches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--trainable", choices=["all", "last-n", "lora"], default="last-n")
    ap.add_argument("--last-n", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sites = cohort(args.out, args.sites, args.slides_per_site)
    central = centralized(sites, args, args.out)
    fed = federated(sites, args, args.out)
    record = {
        "settings": vars(args) | {"out": str(args.out), "json": str(args.json)},
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "centralized": central,
        "federated": fed,
        "ratio_federated_to_centralized": fed["seconds"] / central["seconds"],
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
