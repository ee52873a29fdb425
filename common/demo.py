"""`fedslide demo`: the product's main job on an embedded default cohort.

For now: generate a small synthetic 3-site cohort and preprocess every site. Later stages
(training, distillation, federation) extend it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common.cli_support import EXIT_OK, EXIT_PARTIAL, ConfigError, add_config_arguments, config_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="synthetic 3-site cohort -> preprocessing (the README's main command)",
        description="Generate a synthetic multi-site cohort and preprocess every site. Settings: [synth] and "
        "[preprocess] sections of --config; --set takes section-qualified keys (e.g. preprocess.encoder.batch-size=16).",
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="output directory (default ./demo)")
    p.add_argument("--sites", type=int, default=None, help="number of sites (default 3)")
    p.add_argument("--slides-per-site", type=int, default=None, help="slides per site")
    p.add_argument("--seed", type=int, default=None)
    add_config_arguments(p, example="preprocess.encoder.batch-size=16")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from client.preprocess import SitePreprocessor
    from client.synth.cohort import generate_cohort
    from common.config.preprocess import PreprocessConfig
    from common.config.synth import SynthConfig

    start = time.perf_counter()
    per_section: dict[str, list[str]] = {"synth": [], "preprocess": []}
    for text in args.overrides:
        section, _, rest = text.partition(".")
        if section not in per_section or not rest:
            raise ConfigError(f"demo override {text!r} must start with one of: synth., preprocess.")
        per_section[section].append(rest)
    synth_cfg = config_from_args(
        SynthConfig,
        argparse.Namespace(config=args.config, overrides=per_section["synth"]),
        "synth",
        {"out_dir": str(args.out / "cohort"), "sites": args.sites, "slides_per_site": args.slides_per_site, "seed": args.seed},
    )
    pre_cfg = config_from_args(
        PreprocessConfig, argparse.Namespace(config=args.config, overrides=per_section["preprocess"]), "preprocess"
    )
    print(f"[1/2] generating {synth_cfg.sites} sites x {synth_cfg.slides_per_site} slides in {synth_cfg.out_dir}")
    sites = generate_cohort(synth_cfg)
    print(f"[2/2] preprocessing {len(sites)} sites with {pre_cfg.encoder.name}")
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
    print(f"demo finished in {time.perf_counter() - start:.0f} s; results under {args.out.resolve()}")
    print("  features: <site>/features/<encoder>/{high,low}/*.h5   QC images: <site>/qc/*.png")
    return code
