"""`fedslide config dump`: write configs/defaults.toml and pyproject's Flower app config from the models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedslide.common.cli_support import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from fedslide.common.config.dump import SOURCE_ROOT, stale_files, write_files


def add_parser(subparsers: Any) -> None:
    """Register `config` (with `config dump`) on the `fedslide` subcommand parser."""
    parser = subparsers.add_parser(
        "config",
        help="write configs/defaults.toml and pyproject's Flower app config from the config models",
        description=__doc__,
    )
    commands = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    dump = commands.add_parser(
        "dump",
        help="write configs/defaults.toml and pyproject.toml's [tool.flwr.app.config] tables",
        description="Write configs/defaults.toml and pyproject.toml's [tool.flwr.app.config*] tables (the rest of "
        "pyproject.toml is kept byte for byte) from the pydantic models in common/config/.",
        epilog="Exit codes: 0 written (or, with --check, current), 1 --check found a file that differs, 2 --root is "
        "not a source checkout.",
    )
    dump.add_argument("--check", action="store_true", help="write nothing; fail naming each file that differs")
    dump.add_argument("--root", type=Path, default=SOURCE_ROOT, help="source checkout (default: %(default)s)")
    dump.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Write (or with --check compare) the generated settings files."""
    if not (args.root / "pyproject.toml").is_file():
        print(
            f"fedslide config dump: {args.root} is not a source checkout (no pyproject.toml); pass --root",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.check:
        stale = stale_files(args.root)
        for path in stale:
            print(f"{path} differs from the config models; run `fedslide config dump`", file=sys.stderr)
        return EXIT_ERROR if stale else EXIT_OK
    for path in write_files(args.root):
        print(f"wrote {path}")
    return EXIT_OK
