"""`fedslide demo`: the product's main job, on a synthetic cohort, with a real Flower deployment on this host.

Generates a synthetic 3-site cohort, preprocesses every site, starts a SuperLink and one SuperNode
per site as separate processes (TLS and SuperNode authentication on), runs the federated
teacher -> experts -> low-res student protocol, stops every process, and predicts each site's test
slides from low-res patches only with the student bundle pushed back to that site.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from fedslide.client.inference.run import predict_slides
from fedslide.client.preprocess import SitePreprocessor
from fedslide.client.synth.cohort import generate_cohort
from fedslide.common.cli_support import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PARTIAL,
    ConfigError,
    add_config_arguments,
    config_from_args,
)
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.config.synth import SynthConfig
from fedslide.common.distillation.bundle import BUNDLE_FILE
from fedslide.common.evaluation.predictions import missing_predictions_cause
from fedslide.common.processes import ProcessFailed
from fedslide.common.training.splits import recorded_splits
from fedslide.deploy.federate import FederationFailed, LaunchOptions, run_consortium

DEMO_CONFIG = Path(str(files("fedslide.configs") / "demo.toml"))  # shipped in the package
SECTIONS = ("synth", "preprocess", "federation", "predict")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="synthetic 3-site cohort -> preprocessing -> Flower federation (TLS) -> low-res prediction (the main command)",
        description="Generate a synthetic multi-site cohort, preprocess every site, run the federation with a real "
        "SuperLink and one SuperNode per site on this host, and predict every site's test slides from low-res "
        "patches. Settings: [synth], [preprocess], [federation] and [predict] of --config (default configs/demo.toml); "
        "--set takes section-qualified keys (e.g. federation.rounds.teacher=8, preprocess.encoder.batch-size=16).",
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="output directory (default ./demo)")
    p.add_argument("--sites", type=int, default=None, help="number of sites (default 3)")
    p.add_argument("--slides-per-site", type=int, default=None, help="slides per site")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--resume", metavar="RUN_ID", default=None, help="continue the federated run RUN_ID from its checkpoint"
    )
    p.add_argument("--insecure", action="store_true", help="no TLS / node authentication (prints a warning)")
    add_config_arguments(p, example="federation.rounds.teacher=8")
    p.set_defaults(handler=run, config=None)


def run(args: argparse.Namespace) -> int:

    start = time.perf_counter()
    config = args.config or str(DEMO_CONFIG)
    per_section: dict[str, list[str]] = {s: [] for s in SECTIONS}
    for text in args.overrides:
        section, _, rest = text.partition(".")
        if section not in per_section or not rest:
            raise ConfigError(f"demo override {text!r} must start with one of: {', '.join(s + '.' for s in SECTIONS)}")
        per_section[section].append(rest)

    def section_cfg(model: type, section: str, values: dict | None = None):  # noqa: ANN202
        return config_from_args(
            model, argparse.Namespace(config=config, overrides=per_section[section]), section, values
        )

    out = args.out.resolve()
    synth_cfg = section_cfg(
        SynthConfig,
        "synth",
        {
            "out_dir": str(out / "cohort"),
            "sites": args.sites,
            "slides_per_site": args.slides_per_site,
            "seed": args.seed,
        },
    )
    pre_cfg = section_cfg(PreprocessConfig, "preprocess")
    values: dict[str, Any] = {"runs_dir": str(out / "runs")}
    if args.resume:
        values.update({"run_id": args.resume, "resume": True})
    fed_cfg = section_cfg(FederationConfig, "federation", values)
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
    print(
        f"[3/4] federation: SuperLink + {len(sites)} SuperNodes on this host "
        f"({'INSECURE' if args.insecure else 'TLS + SuperNode authentication'}), `flwr run`"
    )
    try:
        run_dir = run_consortium(sites, fed_cfg, LaunchOptions(out / "federation", insecure=args.insecure))
    except (FederationFailed, ProcessFailed) as exc:
        print(f"fedslide demo: the federation FAILED\n{exc}")
        return EXIT_ERROR
    _print_rows(run_dir)
    print("[4/4] predicting every site's held-out test slides from low-res patches, with the bundle pushed back to it")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for site in sites:
        bundle = site / "runs" / run_dir.name / "student_bundle"
        if not (bundle / BUNDLE_FILE).is_file():
            print(f"  {site.name}: no student bundle at {bundle}: {missing_predictions_cause(metrics, site.name)}")
            code = EXIT_PARTIAL
            continue
        prediction = predict_slides(_test_slides(site), bundle, run_dir / "predictions" / site.name, predict_cfg)
        for line in prediction.summary_lines():
            print(f"  {site.name}: {line}")
        if prediction.failures:
            code = EXIT_PARTIAL
    print(f"demo finished in {time.perf_counter() - start:.0f} s; results under {out}")
    print(f"  run: {run_dir} (metrics.json, report.md, plots/, logs/, models/, predictions/)")
    print(f"  each site: {out / 'cohort' / '<site>' / 'runs' / run_dir.name} (egress.jsonl: everything that left it)")
    return code


def _print_rows(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for row in metrics["rows"]:
        values = ", ".join(f"{k} {row[k]:.3f}" for k in ("auc", "acc", "brier") if isinstance(row.get(k), float))
        print(f"  {row['model']:<13} test ({row['n']} slides): {values}")


def _test_slides(site: Path) -> list[Path]:
    """The slide files of a site's test split (labels.csv `split` column, else the site's carved splits.csv)."""
    ids = {sid for sid, split in recorded_splits(site).items() if split == "test"}
    return sorted(p for p in (site / "slides").iterdir() if p.stem in ids)
