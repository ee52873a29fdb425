"""Pieces every `fedslide` subcommand shares: config flags, loading, exit codes."""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from fedslide.common.config.base import ConfigError, StageConfig, load_config

ConfigT = TypeVar("ConfigT", bound=StageConfig)

EXIT_OK = 0
EXIT_ERROR = 1  # unexpected failure (a bug or an environment problem)
EXIT_USAGE = 2  # bad command line or config: nothing was done
EXIT_PARTIAL = 3  # the job ran but some items (slides, folds, sites) failed: see the failure report


def add_config_arguments(parser: argparse.ArgumentParser, example: str = "tiling.low-mpp=2.0") -> None:
    """`--config FILE` and repeatable `--set key=value` (keys relative to the stage's section)."""
    parser.add_argument("--config", type=str, default=None, help="TOML config file (see configs/defaults.toml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one setting, e.g. --set {example} (repeatable)",
    )


def config_from_args(
    model: type[ConfigT], args: argparse.Namespace, section: str, values: dict[str, Any] | None = None
) -> ConfigT:
    """Stage config from defaults < --config file [section] < explicit flags (`values`) < --set."""
    return load_config(model, path=args.config, section=section, overrides=args.overrides, values=values)


__all__ = [
    "ConfigError",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "add_config_arguments",
    "config_from_args",
]
