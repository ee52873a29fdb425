"""`fedslide demo`: the product's main job on an embedded default cohort.

Generates a synthetic 3-site cohort, preprocesses every site, runs the centralized high→low
distillation (teacher, D&D experts, low-res student) and predicts the test slides of every site
from low-res patches only. The Flower federation will replace the centralized step.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from common.cli_support import EXIT_OK, EXIT_PARTIAL, ConfigError, add_config_arguments, config_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="synthetic 3-site cohort -> preprocessing -> distillation -> low-res prediction (the main command)",
        description="Generate a synthetic multi-site cohort, preprocess every site, distil a low-res student "
        "(centralized) and predict every site's test slides from low-res patches. Settings: [synth], [preprocess], "
        "[distill] and [predict] sections of --config; --set takes section-qualified keys "
        "(e.g. preprocess.encoder.batch-size=16, distill.kd.temperature=4).",
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="output directory (default ./demo)")
    p.add_argument("--sites", type=int, default=None, help="number of sites (default 3)")
    p.add_argument("--slides-per-site", type=int, default=None, help="slides per site")
    p.add_argument("--seed", type=int, default=None)
    add_config_arguments(p, example="preprocess.encoder.batch-size=16")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from client.inference.run import predict_slides
    from client.preprocess import SitePreprocessor
    from client.synth.cohort import generate_cohort
    from common.config.distill import DistillConfig
    from common.config.predict import PredictConfig
    from common.config.preprocess import PreprocessConfig
    from common.config.synth import SynthConfig
    from common.distillation.cli import format_rows
    from common.distillation.pipeline import run_distill

    start = time.perf_counter()
    per_section: dict[str, list[str]] = {"synth": [], "preprocess": [], "distill": [], "predict": []}
    for text in args.overrides:
        section, _, rest = text.partition(".")
        if section not in per_section or not rest:
            raise ConfigError(f"demo override {text!r} must start with one of: synth., preprocess., distill., predict.")
        per_section[section].append(rest)

    def section_cfg(model: type, section: str, values: dict | None = None):  # noqa: ANN202
        return config_from_args(
            model, argparse.Namespace(config=args.config, overrides=per_section[section]), section, values
        )

    synth_cfg = section_cfg(
        SynthConfig,
        "synth",
        {"out_dir": str(args.out / "cohort"), "sites": args.sites, "slides_per_site": args.slides_per_site, "seed": args.seed},
    )
    pre_cfg = section_cfg(PreprocessConfig, "preprocess")
    run_dir = args.out / "run"
    distill_cfg = section_cfg(DistillConfig, "distill", {"out_dir": str(run_dir)})
    predict_cfg = section_cfg(PredictConfig, "predict")
    print(f"[1/4] generating {synth_cfg.sites} sites x {synth_cfg.slides_per_site} slides in {synth_cfg.out_dir}")
    sites = generate_cohort(synth_cfg)
    print(f"[2/4] preprocessing {len(sites)} sites with {pre_cfg.encoder.name}")
    code = EXIT_OK
    preprocessor = SitePreprocessor(pre_cfg)
    for site in sites:
        summary = preprocessor.run(site)
        print(
            f"  {site.name}: {summary.count('done')} done, {summary.count('skipped')} skipped, "
            f"{summary.count('failed')} failed; patches low {summary.patches('low')}, high {summary.patches('high')}; "
            f"{summary.seconds:.1f} s"
        )
        if summary.failed:
            code = EXIT_PARTIAL
    print("[3/4] distilling: LRMIL adapter -> high-res teacher -> D&D experts -> low-res student (centralized)")
    distill_cfg = distill_cfg.model_copy(update={"sites": list(sites)})
    report = run_distill(distill_cfg, pre_cfg)
    print(format_rows(report.metrics["rows"]))
    test_slides = [path for site in sites for path in _test_slides(site)]
    print(f"[4/4] predicting {len(test_slides)} held-out test slides from low-res patches only")
    prediction = predict_slides(test_slides, run_dir / "student", args.out / "predictions", predict_cfg)
    for line in prediction.summary_lines():
        print(f"  {line}")
    if prediction.failures:
        code = EXIT_PARTIAL
    print(f"demo finished in {time.perf_counter() - start:.0f} s; results under {args.out.resolve()}")
    print("  features: cohort/<site>/features/<encoder>/{high,low}/*.h5   QC images: cohort/<site>/qc/*.png")
    print("  models and metrics: run/metrics.json, run/student/   predictions and heatmaps: predictions/")
    return code


def _test_slides(site: Path) -> list[Path]:
    """The slide files of a site's test split (labels.csv `split` column)."""
    with (site / "labels.csv").open(newline="") as fh:
        ids = {row["slide_id"] for row in csv.DictReader(fh) if row.get("split") == "test"}
    return sorted(p for p in (site / "slides").iterdir() if p.stem in ids)
