"""`fedslide distill`: LRMIL cross-resolution adapter + teacher + D&D experts -> low-res student bundles."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from fedslide.common.cli_support import EXIT_ERROR, EXIT_OK, EXIT_USAGE, add_config_arguments, config_from_args
from fedslide.common.metrics import METRIC_NAMES
from fedslide.common.training.errors import TrainingInputError

SECTION = "distill"


def add_parser(subparsers: Any) -> None:
    """Register `distill` on the `fedslide` subcommand parser."""
    parser = subparsers.add_parser(
        "distill",
        help="train adapter, teacher, experts and low-res students on the sites' feature files (centralised)",
        description=__doc__,
        epilog=(
            "Reads <site>/labels.csv (split column train/val/test) and <site>/features/<encoder>/{low,high}/. "
            "Flags override the [distill] section of --config (its [preprocess] section, if any, is recorded in "
            "the bundles); any other setting: --set KEY=VALUE, e.g. --set kd.temperature=4 "
            "--set clusters.num-clusters=2 --set student.name=transmil. Outputs in --out: metrics.json, "
            "student/ (LRMIL + D&D), lrmil_student/, baseline_low/, cache/logits.pt. "
            "Exit codes: 0 ok, 2 bad input or config (nothing trained), 1 training failed."
        ),
    )
    parser.add_argument("--sites", nargs="+", metavar="DIR", help="site directories")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory")
    parser.add_argument("--encoder", metavar="NAME", help="features/<NAME> (default: the only encoder present)")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--device", help="auto, cpu, cuda[:i], mps")
    parser.add_argument("--epochs", type=int, metavar="E", help="maximum epochs of teacher, experts and students")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--clinical",
        action="store_true",
        help="also train a bidirectional-distillation model on the student's instances and the sites' clinical.csv "
        "into student/ (= [clinical] enabled = true; the schema is the --config file's [clinical] section)",
    )
    add_config_arguments(parser, example="kd.temperature=4")
    parser.set_defaults(handler=handle)


def _cli_values(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sites": args.sites,
        "out_dir": args.out,
        "encoder": args.encoder,
        "seed": args.seed,
        "device": args.device,
        "training.epochs": args.epochs,
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Test-split table: one line per model."""
    header = f"{'model':<18}" + "".join(f"{name:>14}" for name in METRIC_NAMES)
    lines = [header]
    for row in rows:
        cells = []
        for name in METRIC_NAMES:
            value = row.get(name)
            cells.append(f"{value:>14.3f}" if isinstance(value, float) and math.isfinite(value) else f"{'n/a':>14}")
        lines.append(f"{row['model']:<18}" + "".join(cells))
    return "\n".join(lines)


def handle(args: argparse.Namespace) -> int:
    """Run `fedslide distill`; returns an exit code."""
    from fedslide.common.clinical import ClinicalDataError
    from fedslide.common.config.clinical import ClinicalConfig
    from fedslide.common.config.distill import DistillConfig
    from fedslide.common.config.preprocess import PreprocessConfig
    from fedslide.common.distillation.clustering import ClusteringError
    from fedslide.common.distillation.pipeline import run_distill

    cfg = config_from_args(DistillConfig, args, SECTION, values=_cli_values(args))
    preprocess = config_from_args(PreprocessConfig, argparse.Namespace(config=args.config, overrides=[]), "preprocess")
    clinical = config_from_args(
        ClinicalConfig,
        argparse.Namespace(config=args.config, overrides=[]),
        "clinical",
        values={"enabled": True} if getattr(args, "clinical", False) else None,
    )
    try:
        report = run_distill(cfg, preprocess, progress=False if args.no_progress else None, clinical=clinical)
    except (TrainingInputError, ClusteringError, ClinicalDataError) as exc:
        print(f"fedslide distill: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as exc:
        print(f"fedslide distill: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(format_rows(report.metrics["rows"]))
    print(f"outputs in {report.out_dir}: metrics.json, " + ", ".join(f"{p.name}/" for p in report.bundles.values()))
    return EXIT_OK
