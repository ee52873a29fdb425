"""The `fedslide` command: one subcommand per stage."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from fedslide.common import __version__
from fedslide.common.cli_support import EXIT_USAGE, ConfigError


@dataclass(frozen=True)
class Subcommand:
    """Where a subcommand is defined: `module.register(subparsers)` adds it; `help` is its line in `fedslide --help`."""

    module: str
    help: str
    register: str = "add_parser"


# only the chosen subcommand's module is imported: `preprocess`, `train`, `distill` and `predict` load no Flower code
SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand(
        "fedslide.deploy.demo",
        "synthetic 3-site cohort -> preprocessing -> Flower federation (TLS) -> low-res prediction (the main command)",
    ),
    "synth": Subcommand(
        "fedslide.client.synth.cli", "write a synthetic multi-site cohort of pyramidal H&E-like slides"
    ),
    "preprocess": Subcommand(
        "fedslide.client.preprocess_cli", "find tissue, tile at two resolutions, encode, write feature files"
    ),
    "finetune": Subcommand(
        "fedslide.client.finetune_cli",
        "LRMIL stage 1 on pixels: fine-tune the site's 5× encoder against its 20× encoder, re-encode 5× features",
    ),
    "train": Subcommand(
        "fedslide.common.training.cli", "train a MIL model on feature files (cross-validation, metrics, checkpoint)"
    ),
    "distill": Subcommand(
        "fedslide.common.distillation.cli",
        "train adapter, teacher, experts and low-res students on the sites' feature files (centralised)",
    ),
    "predict": Subcommand(
        "fedslide.client.predict_cli",
        "predict slides with a low-res student bundle; heatmaps, timing, optional high-res zoom",
    ),
    "export-qupath": Subcommand(
        "fedslide.client.qupath_cli",
        "QuPath GeoJSON of a past `fedslide predict` run: tissue, patches with measurements, tumour regions",
    ),
    "certs": Subcommand(
        "fedslide.deploy.certs", "make the TLS certificates and per-site authentication keys of a federation"
    ),
    "federate": Subcommand(
        "fedslide.deploy.federate",
        "run the federation on this host: SuperLink + one SuperNode per site (TLS, node auth), `flwr run`",
    ),
    "deploy": Subcommand(
        "fedslide.deploy.compose", "start the coordinating site and/or hospital sites as Docker containers"
    ),
    "superexec": Subcommand(
        "fedslide.client.superexec",
        "a site's SuperExec that runs each ClientApp message in a pre-warmed process (SuperNode --isolation process)",
    ),
    "evaluate": Subcommand(
        "fedslide.deploy.study.cli",
        "leave-one-site-out study: site-local vs federated vs centralized, CIs, report",
        "add_parsers",
    ),
    "report": Subcommand(
        "fedslide.deploy.study.cli",
        "report.md + self-contained report.html of an evaluation study (or a federated run)",
        "add_parsers",
    ),
    "compare": Subcommand(
        "fedslide.deploy.study.cli", "compare the metrics.json of two runs: A, B, B - A, CI overlap", "add_parsers"
    ),
    "config": Subcommand(
        "fedslide.common.config.cli",
        "write configs/defaults.toml and pyproject's Flower app config from the config models",
    ),
    "audit": Subcommand(
        "fedslide.client.audit", "verify a site's egress ledgers (hash chain) and print what left it, per run and phase"
    ),
}


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named on a `fedslide` command line (the first argument that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `fedslide` parser with `command`'s module loaded and its arguments; every other subcommand is listed by
    name and help only (its module is not imported)."""
    parser = argparse.ArgumentParser(prog="fedslide", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedslide {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = SUBCOMMANDS.get(command) if command is not None else None
    for name, entry in SUBCOMMANDS.items():  # in the table's order, as `fedslide --help` lists them
        if name in sub.choices:  # registered with the chosen one by its module
            continue
        if chosen is not None and entry.module == chosen.module:
            getattr(importlib.import_module(entry.module), entry.register)(sub)
        else:
            sub.add_parser(name, help=entry.help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; each subcommand's handler returns an exit code (see common.cli_support)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(chosen_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"fedslide {args.command}: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
