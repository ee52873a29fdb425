"""`fedslide preprocess`: tiles and encodes the slides of one or more sites."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedslide.common.cli_support import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, add_config_arguments, config_from_args
from fedslide.common.config.preprocess import PreprocessConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="find tissue, tile at two resolutions, encode, write feature files",
        description=(
            "Preprocess every slide in SITE/slides into SITE/features/<encoder>/{high,low}/<slide_id>.h5. "
            "Finished slides are skipped on a rerun. Exit codes: 0 all slides done or skipped, "
            "2 bad configuration or no slides, 3 some slides failed (see features/<encoder>/failures.csv)."
        ),
    )
    p.add_argument(
        "--site", dest="sites", action="append", required=True, type=Path, help="site directory (repeatable)"
    )
    p.add_argument("--resolutions", choices=["both", "low", "high"], default=None, help="which feature files to write")
    p.add_argument("--encoder", default=None, help="encoder name (default efficientnet_lite0)")
    p.add_argument("--weights", type=Path, default=None, help="local weights file for the encoder")
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for slides without resolution metadata")
    p.add_argument("--batch-size", type=int, default=None, help="patches per encoder forward pass")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--overwrite", action="store_true", default=None, help="redo slides that are already complete")
    p.add_argument(
        "--clam-layout",
        action="store_true",
        default=None,
        help="also write CLAM's layout: SITE/clam/<encoder>/<high|low>/{h5_files,pt_files}/",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=None,
        help="local (default): slides one after another here; ray: one task per slide over a Ray cluster",
    )
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster to join, e.g. auto or HOST:6379 (implies --executor ray)"
    )
    add_config_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedslide.client.preprocess import preprocess_site
    from fedslide.client.preprocess_ray import preprocess_site_ray
    from fedslide.client.slides import SlideError

    values = {
        "resolutions": args.resolutions,
        "encoder.name": args.encoder,
        "encoder.weights": str(args.weights) if args.weights else None,
        "slide.mpp_override": args.mpp,
        "encoder.batch_size": args.batch_size,
        "encoder.num_workers": args.workers,
        "encoder.device": args.device,
        "overwrite": args.overwrite,
        "clam_layout": args.clam_layout,
        "progress": args.progress,
        "executor": args.executor or ("ray" if args.ray_address else None),
        "ray_address": args.ray_address,
    }
    cfg = config_from_args(PreprocessConfig, args, "preprocess", values)
    for site in args.sites:
        if not site.is_dir():
            print(f"fedslide preprocess: site directory {site} does not exist", file=sys.stderr)
            return EXIT_USAGE
    code = EXIT_OK
    for site in args.sites:
        try:
            summary = preprocess_site(site, cfg) if cfg.executor == "local" else preprocess_site_ray(site, cfg)
        except SlideError as exc:  # this site cannot start; the other sites still run
            print(f"fedslide preprocess: {exc}", file=sys.stderr)
            code = EXIT_USAGE
            continue
        out = site / "features" / summary.encoder
        print(
            f"{site}: {summary.count('done')} done, {summary.count('skipped')} skipped, {summary.count('failed')} failed; "
            f"patches low {summary.patches('low')}, high {summary.patches('high')}; {summary.seconds:.1f} s -> {out}"
        )
        if summary.failed:
            print(f"  failures listed in {out / 'failures.csv'}:", file=sys.stderr)
            for s in summary.failed:
                print(f"  - {s.slide_id}: {s.reason}", file=sys.stderr)
            code = code if code == EXIT_USAGE else EXIT_PARTIAL
    return code
