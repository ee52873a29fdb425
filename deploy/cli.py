"""The `fedslide` command: one subcommand per stage."""

from __future__ import annotations

import argparse
import logging
import sys

from fedslide.common import __version__
from fedslide.common.cli_support import EXIT_USAGE, ConfigError


def build_parser() -> argparse.ArgumentParser:
    from fedslide.client.predict_cli import add_parser as add_predict
    from fedslide.client.preprocess_cli import add_parser as add_preprocess
    from fedslide.client.superexec import add_parser as add_superexec
    from fedslide.client.synth.cli import add_parser as add_synth
    from fedslide.deploy.demo import add_parser as add_demo
    from fedslide.common.distillation.cli import add_parser as add_distill
    from fedslide.deploy.study.cli import add_parsers as add_evaluation
    from fedslide.deploy.federate import add_parser as add_federate
    from fedslide.common.training.cli import add_parser as add_train
    from fedslide.deploy.certs import add_parser as add_certs
    from fedslide.deploy.compose import add_parser as add_deploy

    parser = argparse.ArgumentParser(prog="fedslide", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedslide {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_demo, add_synth, add_preprocess, add_train, add_distill, add_predict, add_certs, add_federate, add_deploy,
                add_superexec):
        add(sub)
    add_evaluation(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; each subcommand's handler returns an exit code (see common.cli_support)."""
    parser = build_parser()
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
