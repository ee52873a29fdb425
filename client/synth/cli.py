"""`fedslide synth`: write a synthetic multi-site cohort of pyramidal slides."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedslide.common.cli_support import EXIT_OK, add_config_arguments, config_from_args
from fedslide.common.config.synth import SynthConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `synth` subcommand."""
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic multi-site cohort of pyramidal H&E-like slides",
        description="Write N sites × K synthetic slides (Aperio SVS at 40× and generic TIFF at 20× by default) with "
        "labels.csv, ground-truth tumor masks and cohort.json per site. Settings: [synth] section of --config.",
    )
    p.add_argument("--out", type=Path, default=None, help="cohort root folder (required unless out-dir is in --config)")
    p.add_argument("--sites", type=int, default=None, help="number of sites (default 3)")
    p.add_argument("--slides-per-site", type=int, default=None, help="slides per site (default 6)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="slides rendered in parallel processes (default 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    add_config_arguments(p, example="slide-size-um=[1000.0,1500.0]")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate the cohort and print a summary; returns an exit code."""
    from fedslide.client.synth.cohort import generate_cohort

    values: dict[str, Any] = {
        "out_dir": str(args.out) if args.out is not None else None,
        "sites": args.sites,
        "slides_per_site": args.slides_per_site,
        "seed": args.seed,
        "workers": args.workers,
        "progress": args.progress,
    }
    cfg = config_from_args(SynthConfig, args, section="synth", values=values)
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    site_dirs = generate_cohort(cfg, on_slide=records.append)
    seconds = time.perf_counter() - start
    written = sum(r["written"] for r in records)
    files = sum(1 for d in site_dirs for f in d.rglob("*") if f.is_file())
    print(
        f"synth: {len(site_dirs)} sites, {len(records)} slides ({written} written, {len(records) - written} kept), "
        f"{files} files under {cfg.out_dir.resolve()} in {seconds:.1f} s"
    )
    for d in site_dirs:
        n = sum(1 for r in records if r["slide_id"].startswith(f"{d.name}_"))
        print(f"  {d.name}: {n} slides, labels {d / 'labels.csv'}")
    return EXIT_OK
