"""`fedslide evaluate`, `fedslide report` and `fedslide compare`: cross-site evaluation, readable reports, run comparison."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedslide.common.cli_support import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    add_config_arguments,
    config_from_args,
)
from fedslide.common.config.evaluate import EvaluateConfig
from fedslide.common.distillation.clustering import ClusteringError
from fedslide.common.evaluation.compare import (
    CompareError,
    compare,
    load,
    markdown,
    to_json,
)
from fedslide.common.evaluation.predictions import PredictionsError
from fedslide.common.evaluation.report import ReportError, write_report
from fedslide.common.metrics import METRIC_NAMES
from fedslide.common.training.errors import TrainingInputError
from fedslide.deploy.study.loso import StudyError, run_study

SECTION = "evaluate"

EVALUATE_HELP = """\
Leave-one-site-out study. For every site h: a federation of all sites in which h only evaluates
(it receives the final models and returns metrics), the centralized (pooled) model without h, and
h's site-local model; all are scored in-distribution (each training site's test split) and
out-of-site (h's slides), with bootstrap CIs, the in-distribution - out-of-site gap and paired
AUC tests, into OUT/metrics.json (schema fedslide.evaluation.metrics/1) and OUT/predictions.csv.

Study setting: in a federation each site keeps its per-slide predictions and heatmaps
(<site>/runs/<run-id>/); this command runs where every site's folder is available (a study or
benchmark) and reads them there. Federations run in-process with the real ServerApp/ClientApp code.
"""


def add_parsers(subparsers: Any) -> None:
    """Register `evaluate`, `report` and `compare` on the `fedslide` subcommand parser."""
    ev = subparsers.add_parser(
        "evaluate",
        help="leave-one-site-out study: site-local vs federated vs centralized, CIs, report",
        description=EVALUATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Flags override the [evaluate] section of --config; nested settings: --set federation.rounds.teacher=4 "
            "--set distill.training.epochs=20 --set heatmaps.per-class=2. A rerun with the same OUT reuses finished "
            "folds and resumes an interrupted federation. Outputs in OUT: metrics.json, predictions.csv, federation/, "
            "centralized/, local/, heatmaps/, report.md, report.html. Exit codes: 0 ok, 2 bad input or config, "
            "1 a fold failed (the message names its run folder)."
        ),
    )
    ev.add_argument("--sites", nargs="+", metavar="DIR", help="site directories (at least 2; 3+ for federations)")
    ev.add_argument("--out", metavar="DIR", help="study folder")
    ev.add_argument("--encoder", metavar="NAME", help="features/<NAME> (default: the only encoder present)")
    ev.add_argument(
        "--regimes", nargs="+", choices=("local", "federated", "centralized"), help="what to train (default: all)"
    )
    ev.add_argument("--bootstrap", type=int, metavar="N", help="bootstrap resamples per CI (default 1000)")
    ev.add_argument("--seed", type=int, help="seed of the bootstrap and example choice")
    ev.add_argument("--no-report", action="store_true", help="do not write report.md / report.html")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(ev, example="federation.rounds.teacher=4")
    ev.set_defaults(handler=handle_evaluate)

    rp = subparsers.add_parser(
        "report",
        help="report.md + self-contained report.html of an evaluation study (or a federated run)",
        description=__doc__,
        epilog="RUN_DIR holds metrics.json of `fedslide evaluate` (full report) or of a federated run (no CIs/ROC/"
        "heatmaps: per-slide predictions stay at the sites). Exit codes: 0 ok, 2 not a run folder.",
    )
    rp.add_argument("run_dir", metavar="RUN_DIR", help="study folder (or federated run folder)")
    rp.add_argument(
        "--out", metavar="DIR", help="where to write the report (default: RUN_DIR; a federated run: RUN_DIR/report)"
    )
    rp.set_defaults(handler=handle_report)

    cp = subparsers.add_parser(
        "compare",
        help="compare the metrics.json of two runs: A, B, B - A, CI overlap",
        description="Compare two runs' metrics (evaluation studies, federated runs or distillations).",
        epilog="Exit codes: 0 ok, 2 a run is missing/unreadable or the two share no metric.",
    )
    cp.add_argument("run_a", metavar="RUN_A", help="run folder or metrics.json")
    cp.add_argument("run_b", metavar="RUN_B", help="run folder or metrics.json")
    cp.add_argument("--metric", action="append", metavar="NAME", help="only these metrics (repeatable; default all)")
    cp.add_argument("--per-site", action="store_true", help="also every site's rows (default: pooled / overall only)")
    cp.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")
    cp.set_defaults(handler=handle_compare)


def _values(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sites": args.sites,
        "out_dir": args.out,
        "encoder": args.encoder,
        "regimes": args.regimes,
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "report": False if args.no_report else None,
        "progress": False if args.no_progress else None,
    }


def format_summary(metrics: dict[str, Any]) -> str:
    """AUC in-distribution / out-of-site / gap per model (pooled), for the terminal."""
    lines = [f"{'model':<26}{'AUC in-dist':>14}{'AUC out-of-site':>17}{'gap':>9}"]
    for model, section in metrics["models"].items():
        ins = (section["in_distribution"]["overall"] or {}).get("auc", {}).get("estimate")
        out = (section["out_of_site"]["overall"] or {}).get("auc", {}).get("estimate")
        gap = section["gap"]["overall"]["auc"]
        cells = [f"{v:.3f}" if isinstance(v, float) else "n/a" for v in (ins, out, gap)]
        lines.append(f"{model:<26}{cells[0]:>14}{cells[1]:>17}{cells[2]:>9}")
    return "\n".join(lines)


def handle_evaluate(args: argparse.Namespace) -> int:
    """Run `fedslide evaluate`; returns an exit code."""

    cfg = config_from_args(EvaluateConfig, args, SECTION, values=_values(args))
    try:
        result = run_study(cfg)
    except (TrainingInputError, ClusteringError, PredictionsError) as exc:
        print(f"fedslide evaluate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StudyError as exc:
        print(f"fedslide evaluate: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(format_summary(result.metrics))
    print(
        f"outputs in {result.out_dir}: metrics.json, predictions.csv"
        + (", report.md, report.html" if result.report else "")
    )
    return EXIT_OK


def handle_report(args: argparse.Namespace) -> int:
    """Run `fedslide report`; returns an exit code."""

    try:
        md, page = write_report(Path(args.run_dir), args.out)
    except ReportError as exc:
        print(f"fedslide report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {md} and {page}")
    return EXIT_OK


def handle_compare(args: argparse.Namespace) -> int:
    """Run `fedslide compare`; returns an exit code."""

    unknown = [m for m in args.metric or [] if m not in METRIC_NAMES]
    if unknown:
        print(f"fedslide compare: unknown metric(s) {unknown}; choose from {', '.join(METRIC_NAMES)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        (a, file_a), (b, file_b) = load(args.run_a), load(args.run_b)
        rows = compare(a, b, args.metric, args.per_site)
    except CompareError as exc:
        print(f"fedslide compare: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(markdown(rows, str(file_a), str(file_b)))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(rows, file_a, file_b), indent=2) + "\n")
    return EXIT_OK
