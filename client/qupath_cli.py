"""`fedslide export-qupath`: QuPath GeoJSON of every slide of a past `fedslide predict` output folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedslide.common.cli_support import EXIT_OK, EXIT_USAGE, ConfigError, add_config_arguments, config_from_args
from fedslide.common.config.predict import PredictConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-qupath",
        help="QuPath GeoJSON of a past `fedslide predict` run: tissue, patches with measurements, tumour regions",
        description=(
            "Write RUN_DIR/qupath/<slide_id>.geojson (or OUT/...) for every slide predicted by `fedslide predict "
            "--out RUN_DIR`, from its overlay records RUN_DIR/overlays/<slide_id>.npz. Coordinates are level-0 "
            "pixels; import in QuPath with File > Import objects. Options come from the [predict.qupath] section. "
            "Exit codes: 0 written, 2 no overlay records or bad options."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output folder of `fedslide predict`")
    p.add_argument("--out", type=Path, default=None, help="write OUT/qupath/ instead of RUN_DIR/qupath/")
    p.add_argument("--tumour-class", default=None, help="class drawn as tumour (default: a tumour-like class name)")
    p.add_argument(
        "--threshold", type=float, default=None, help="tumour probability at which a patch joins a tumour region"
    )
    add_config_arguments(p, example="qupath.patch-object=detection")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedslide.client.inference.qupath import QupathExportError, export_run

    values = {"qupath.tumour_class": args.tumour_class, "qupath.region_threshold": args.threshold}
    try:
        cfg = config_from_args(PredictConfig, args, "predict", values)
        written = export_run(args.run_dir, cfg.qupath, args.out)
    except ConfigError as exc:
        print(f"fedslide export-qupath: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except QupathExportError as exc:
        print(f"fedslide export-qupath: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {len(written)} QuPath GeoJSON file(s) to {written[0].parent}")
    return EXIT_OK
