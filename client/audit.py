"""`fedslide audit SITE_DIR`: verify the hash chain of every run's egress ledger and print what left the site.

For each `<runs-dir>/<run_id>/egress.jsonl` (runs-dir: SITE_DIR/runs unless `--runs-dir`), the chain is verified
line by line (`common.ledger.verify_chain`) and the verified lines are summarised per phase: replies, rounds,
bytes, arrays (record, name, shape, dtype) and error replies (code and name). Exit 0 when every chain verifies,
1 naming the file and line where one breaks, 2 when there is no such site directory.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedslide.common.cli_support import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from fedslide.common.ledger import ChainBreak, verify_chain

LEDGER = "egress.jsonl"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "audit",
        help="verify a site's egress ledgers (hash chain) and print what left it, per run and phase",
        description=(
            "Verify the hash chain of every run's egress ledger under SITE_DIR/runs (or --runs-dir) and print, per "
            "run and phase, what left the site: replies, rounds, bytes, arrays with shapes, and error replies. "
            "Exit codes: 0 every chain verifies, 1 a chain breaks (the file and line are named: a line edited, "
            "deleted or inserted), 2 no such site directory."
        ),
    )
    p.add_argument("site_dir", type=Path, metavar="SITE_DIR", help="the site's directory (as in its node config)")
    p.add_argument("--runs-dir", type=Path, default=None, help="the node config's runs-dir (default SITE_DIR/runs)")
    p.set_defaults(handler=run)


def ledgers(runs_dir: Path) -> list[Path]:
    """Every run's ledger under `runs_dir`, by run id."""
    return sorted(runs_dir.glob(f"*/{LEDGER}")) if runs_dir.is_dir() else []


def _verified_lines(path: Path, broken: ChainBreak | None) -> list[dict[str, Any]]:
    """The ledger's lines before the first break (all of them when the chain verifies)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if broken is not None:
        lines = lines[: broken.line - 1]
    return [json.loads(line) for line in lines if line.strip()]


def _rounds(rounds: set[int]) -> str:
    return f"{min(rounds)}-{max(rounds)}" if len(rounds) > 1 else str(next(iter(rounds)))


def summary(entries: list[dict[str, Any]]) -> list[str]:
    """What the lines say left, per phase (in the order phases first appear): one block of text lines each."""
    phases: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        phases[str(entry.get("phase", "?"))].append(entry)
    out: list[str] = []
    for phase, group in phases.items():
        errors = [e for e in group if e.get("error")]
        out.append(
            f"  {phase}: {len(group)} repl{'y' if len(group) == 1 else 'ies'}, rounds "
            f"{_rounds({int(e.get('round', 0)) for e in group})}, {sum(int(e.get('bytes', 0)) for e in group)} bytes"
            + (f", {len(errors)} error repl{'y' if len(errors) == 1 else 'ies'}" if errors else "")
        )
        arrays: dict[str, int] = defaultdict(int)
        for entry in group:
            for a in entry.get("arrays", []):
                arrays[f"{a['record']}.{a['name']} {a['dtype']} {tuple(a['shape'])}"] += 1
        out.extend(f"    array {name} x{count}" for name, count in arrays.items())
        out.extend(
            f"    error round {e.get('round', 0)}: {e['error'].get('code')} {e['error'].get('name')}" for e in errors
        )
    return out


def audit(runs_dir: Path) -> tuple[list[str], list[ChainBreak]]:
    """The report's lines and every chain break, over all runs' ledgers under `runs_dir`."""
    lines: list[str] = []
    breaks: list[ChainBreak] = []
    for path in ledgers(runs_dir):
        broken = verify_chain(path)
        entries = _verified_lines(path, broken)
        status = f"CHAIN BROKEN at {broken}" if broken else f"chain verified ({len(entries)} lines)"
        lines.append(f"run {path.parent.name}: {path}: {status}")
        lines.extend(summary(entries))
        if broken:
            breaks.append(broken)
    return lines, breaks


def run(args: argparse.Namespace) -> int:
    site_dir: Path = args.site_dir
    if not site_dir.is_dir():
        print(f"fedslide audit: {site_dir}: no such site directory")
        return EXIT_USAGE
    runs_dir = args.runs_dir or site_dir / "runs"
    lines, breaks = audit(runs_dir)
    if not lines:
        print(f"fedslide audit: no ledgers ({LEDGER}) under {runs_dir}: nothing has left this site")
    print("\n".join(lines))
    for broken in breaks:
        print(f"fedslide audit: {broken}")
    return EXIT_ERROR if breaks else EXIT_OK
