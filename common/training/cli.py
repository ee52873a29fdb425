"""`fedslide train`: MIL training with cross-validation on a directory of feature files."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from fedslide.common.cli_support import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    add_config_arguments,
    config_from_args,
)
from fedslide.common.metrics import METRIC_NAMES
from fedslide.common.training.errors import TrainingInputError

SECTION = "train"


def add_parser(subparsers: Any) -> None:
    """Register `train` on the `fedslide` subcommand parser."""
    parser = subparsers.add_parser(
        "train",
        help="train a MIL model on feature files (cross-validation, metrics, checkpoint)",
        description=__doc__,
        epilog=(
            "Flags override the [train] section of --config; --features, --labels and --out set features-dir, "
            "labels and out-dir. Any other setting: --set KEY=VALUE, e.g. --set early-stopping-metric=auc "
            "--set model.hidden-dim=256. Outputs: metrics.json, predictions.csv, history.csv, label_map.json, "
            "model.pt (best fold) and checkpoints/. Exit codes: 0 ok, 2 bad input or config (nothing trained), "
            "1 training failed."
        ),
    )
    parser.add_argument(
        "--features", metavar="DIR", help="directory of <slide_id>.h5 feature files, or a CLAM/TRIDENT feature folder"
    )
    parser.add_argument(
        "--features-layout",
        choices=["fedslide", "clam", "trident"],
        default=None,
        help="whose folder --features is (features-layout.layout; TRIDENT's magnification and encoder: --set "
        "features-layout.high=..., features-layout.encoder=...)",
    )
    parser.add_argument("--labels", metavar="CSV", help="slide_id,label[,split][,patient_id]")
    parser.add_argument("--out", metavar="DIR", help="output directory")
    parser.add_argument("--model", metavar="NAME", help="registered MIL model (e.g. abmil)")
    parser.add_argument("--dropout", type=float, help="model dropout (model.dropout)")
    parser.add_argument(
        "--cv", type=int, metavar="K", help="K-fold patient-grouped cross-validation (ignores a split column)"
    )
    parser.add_argument("--repeats", type=int, metavar="R", help="repeat the folds R times with new seeds")
    parser.add_argument("--epochs", type=int, metavar="E", help="maximum epochs per fold")
    parser.add_argument(
        "--refit",
        type=int,
        nargs="?",
        const=0,
        metavar="K",
        help="per fold, pick the epoch count by K-fold inner CV on its training slides (K: refit-folds, default 5) "
        "and retrain on all of them for that many epochs",
    )
    parser.add_argument("--batch-size", type=int, metavar="B", help="bags per batch")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--max-instances", type=int, metavar="N", help="sample at most N instances per bag in training")
    parser.add_argument("--device", help="auto, cpu, cuda[:i], mps")
    parser.add_argument(
        "--allow-missing",
        action="store_const",
        const=True,
        default=None,
        help="warn (listing the ids) instead of failing on labels without features or features without labels",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser, example="model.hidden-dim=256")
    parser.set_defaults(handler=handle)


def _cli_values(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "features_dir": args.features,
        "features_layout.layout": args.features_layout,
        "labels": args.labels,
        "out_dir": args.out,
        "model.name": args.model,
        "model.dropout": args.dropout,
        "cv_folds": args.cv,
        "splits": "cv" if args.cv is not None else None,
        "repeats": args.repeats,
        "epochs": args.epochs,
        "refit": True if args.refit is not None else None,
        "refit_folds": args.refit or None,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "max_instances": args.max_instances,
        "device": args.device,
        "allow_missing": args.allow_missing,
    }


def _cell(stats: dict[str, float] | None) -> str:
    if not stats or stats.get("n", 0) == 0 or not math.isfinite(stats["mean"]):
        return "n/a"
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"


def format_summary(summary: dict[str, dict[str, dict[str, float]]], folds: int, over: str = "n") -> str:
    """Table of metric mean ± sd (over `folds` folds, or repeats) per evaluated split."""
    splits = [s for s in ("val", "test", "test_calibrated") if s in summary]
    names = [*METRIC_NAMES, "loss"]
    width = max(len(n) for n in names) + 2
    heads = {"test_calibrated": "test T-scaled"}
    titles = [heads.get(s, s) + f" ({over}={folds})" for s in splits]
    col = max(20, *(len(t) + 2 for t in titles)) if titles else 20
    lines = [f"{'metric':<{width}}" + "".join(f"{t:<{col}}" for t in titles)]
    for name in names:
        lines.append(f"{name:<{width}}" + "".join(f"{_cell(summary[s].get(name)):<{col}}" for s in splits))
    return "\n".join(lines)


def handle(args: argparse.Namespace) -> int:
    """Run `fedslide train`; returns an exit code (2 for bad input or config, 1 for a failed run)."""
    from fedslide.common.config.train import TrainConfig
    from fedslide.common.training.run import run_training

    cfg = config_from_args(TrainConfig, args, SECTION, values=_cli_values(args))
    try:
        report = run_training(cfg, progress=False if args.no_progress else None)
    except TrainingInputError as exc:
        print(f"fedslide train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as exc:
        print(f"fedslide train: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(format_summary(report.summary, len(report.folds)))
    repeats = len({f.split.repeat for f in report.folds})
    if repeats > 1 and report.summary_repeats:
        print(f"\nmean ± sd over {repeats} repeats of the per-repeat means:")
        print(format_summary(report.summary_repeats, repeats, over="repeats"))
    print(f"outputs in {report.out_dir}: " + ", ".join(p.name for p in report.files.values()))
    return EXIT_OK
