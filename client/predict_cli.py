"""`fedslide predict`: low-res-only inference with a student bundle (predictions, heatmaps, timing)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedslide.common.cli_support import (
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    ConfigError,
    add_config_arguments,
    config_from_args,
)
from fedslide.common.config.predict import PredictConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict slides with a low-res student bundle; heatmaps, timing, optional high-res zoom",
        description=(
            "Predict every slide in SLIDES with the student of a model bundle, reading low-res patches only: "
            "thumbnail -> tissue -> low-res grid -> encoder -> student. Writes OUT/predictions.csv, "
            "OUT/heatmaps/<slide_id>.png, OUT/overlays/<slide_id>.npz (for `fedslide export-qupath`), OUT/timing.json "
            "OUT/report.html and OUT/failures.csv (bad slides); with --geojson also OUT/qupath/<slide_id>.geojson for "
            "QuPath. A bundle with OOD statistics adds ood_score and ood_flag to predictions.csv and a WARNING line "
            "naming the slides unlike its training slides. "
            "Exit codes: 0 all slides predicted, 2 bad model directory, options or no slides, "
            "3 some slides failed (see failures.csv)."
        ),
    )
    p.add_argument("--slides", type=Path, required=True, help="folder of slide files")
    p.add_argument("--model", type=Path, required=True, help="student bundle directory (RUN_DIR/student)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--zoom",
        dest="zoom_k",
        type=int,
        default=None,
        metavar="K",
        help="also encode the high-res children of the K most attended low-res patches and run the teacher on them",
    )
    p.add_argument(
        "--zoom-threshold",
        dest="zoom_threshold",
        type=float,
        default=None,
        metavar="T",
        help="also zoom into the low-res patches whose relevance (attention scaled to [0, 1] per slide) is above T, "
        "as AHDMIL's pre-screen; with --zoom K at most the K most relevant",
    )
    p.add_argument(
        "--resolution",
        choices=["low", "high"],
        default=None,
        help="'high': reference mode encoding every high-res patch and running the teacher (cost measurement)",
    )
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for slides without resolution metadata")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--batch-size", type=int, default=None, help="patches per encoder forward pass")
    p.add_argument("--weights", type=Path, default=None, help="local weights file of the bundle's encoder")
    p.add_argument(
        "--low-weights",
        type=Path,
        default=None,
        help="fine-tuned 5x encoder weights (SITE/finetune/<encoder>.pt) for a bundle that records only their hash",
    )
    p.add_argument(
        "--clinical",
        type=Path,
        default=None,
        help="clinical table of the slides (e.g. SITE/clinical.csv): with a bundle carrying a BD model, slides with a "
        "complete row are read by its multi-modal branch, the others by its single-modal branch (predictions.csv: "
        "clinical_branch)",
    )
    p.add_argument(
        "--clinical-patients",
        type=Path,
        default=None,
        help="CSV with slide_id and patient_id columns (e.g. SITE/labels.csv) for a patient-keyed --clinical table",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--no-heatmaps", dest="heatmaps", action="store_false", default=None, help="skip heatmap images")
    p.add_argument(
        "--geojson",
        action="store_true",
        default=None,
        help="also write OUT/qupath/<slide_id>.geojson: tissue, patches with attention and tumour probability, "
        "predicted tumour regions (QuPath: File > Import objects)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    add_config_arguments(p, example="zoom-k=4")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedslide.client.inference import ModelDirError, predict_slides
    from fedslide.client.inference.qupath import QupathExportError
    from fedslide.client.slides import SlideError
    from fedslide.common.clinical import ClinicalDataError
    from fedslide.common.distillation.bundle import BundleMismatchError

    values = {
        "zoom_k": args.zoom_k,
        "zoom_threshold": args.zoom_threshold,
        "resolution": args.resolution,
        "slide.mpp_override": args.mpp,
        "num_workers": args.workers,
        "batch_size": args.batch_size,
        "encoder_weights": str(args.weights) if args.weights else None,
        "low_encoder_weights": str(args.low_weights) if args.low_weights else None,
        "clinical": str(args.clinical) if args.clinical else None,
        "clinical_patients": str(args.clinical_patients) if args.clinical_patients else None,
        "device": args.device,
        "heatmaps": args.heatmaps,
        "geojson": args.geojson,
        "progress": args.progress,
    }
    try:
        cfg = config_from_args(PredictConfig, args, "predict", values)
        result = predict_slides(args.slides, args.model, args.out, cfg)
    except ConfigError as exc:
        print(f"fedslide predict: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelDirError, BundleMismatchError, SlideError, QupathExportError, ClinicalDataError) as exc:
        print(f"fedslide predict: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for line in result.summary_lines():
        print(line)
    if result.failures:
        print(f"  failures listed in {result.out_dir / 'failures.csv'}:", file=sys.stderr)
        for f in result.failures:
            print(f"  - {f.slide_id}: {f.reason}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK
