"""`fedslide compare RUN_A RUN_B`: the metrics of two runs side by side, with B − A and whether the CIs overlap.

Reads metrics.json of an evaluation study (`fedslide.evaluation.metrics/1`: every model x setting x
site with CIs, the gaps and the paired tests), a federated run (`fedslide.federation.metrics/1`)
or a centralized distillation (`fedslide.distill.metrics/1`), and flattens each into rows
`(model, setting, site, metric) -> estimate [lo, hi]`. Rows present in both runs are compared.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedslide.common.evaluation.schema import METRICS_SCHEMA
from fedslide.common.metrics import HIGHER_IS_BETTER, METRIC_NAMES

FEDERATION_SCHEMA = "fedslide.federation.metrics/1"
DISTILL_SCHEMA = "fedslide.distill.metrics/1"
SCHEMAS = (METRICS_SCHEMA, FEDERATION_SCHEMA, DISTILL_SCHEMA)


class CompareError(ValueError):
    """A run's metrics.json is missing, unreadable, of an unknown schema, or shares nothing with the other."""


@dataclass(frozen=True)
class Value:
    """A point estimate with its interval (None when the run reports none)."""

    estimate: float | None
    lo: float | None = None
    hi: float | None = None


Key = tuple[str, str, str, str]  # (model, setting, site, metric)


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _iv(entry: Any) -> Value:
    if isinstance(entry, dict):
        return Value(_finite(entry.get("estimate")), _finite(entry.get("lo")), _finite(entry.get("hi")))
    return Value(_finite(entry))


def load(path: Path | str) -> tuple[dict[str, Any], Path]:
    """A run's metrics.json (RUN may be the folder or the file) and the file's path."""
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise CompareError(f"{file} does not exist (give a run folder holding metrics.json, or the file)")
    try:
        doc = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CompareError(f"{file} is not valid JSON: {exc}") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema not in SCHEMAS:
        raise CompareError(f"{file}: schema {schema!r} is not one of {', '.join(SCHEMAS)}")
    return doc, file


def flatten(doc: dict[str, Any]) -> dict[Key, Value]:
    """Rows of a metrics document (see the module doc)."""
    out: dict[Key, Value] = {}
    schema = doc["schema"]
    if schema == METRICS_SCHEMA:
        for model, section in doc.get("models", {}).items():
            for setting in ("in_distribution", "out_of_site"):
                part = section.get(setting, {})
                entries = {"overall": part.get("overall"), **part.get("per_site", {})}
                for site, entry in entries.items():
                    for m in METRIC_NAMES:
                        if entry:
                            out[(model, setting, site, m)] = _iv(entry.get(m))
                for m in METRIC_NAMES:
                    out[(model, setting, "mean_over_sites", m)] = _iv(part.get("mean_over_sites", {}).get(m))
            gap = section.get("gap", {})
            for site, values in {"overall": gap.get("overall", {}), **gap.get("per_site", {})}.items():
                for m in METRIC_NAMES:
                    out[(model, "gap", site, m)] = _iv(values.get(m))
        for t in doc.get("paired_tests", []):
            if "skipped" not in t:
                out[(f"{t['a']} - {t['b']}", t["setting"], t["site"], "auc_diff")] = Value(
                    _finite(t.get("diff")), _finite(t.get("lo")), _finite(t.get("hi"))
                )
    elif schema == FEDERATION_SCHEMA:
        for model, section in doc.get("models", {}).items():
            for part in ("overall", "held_out"):
                for m in METRIC_NAMES:
                    if (section.get(part) or {}).get("n"):
                        out[(model, part, "overall", m)] = _iv(section[part].get(m))
            for site, values in section.get("per_site", {}).items():
                for m in METRIC_NAMES:
                    out[(model, "test", site, m)] = _iv(values.get(m))
    else:
        for row in doc.get("rows", []):
            for m in METRIC_NAMES:
                out[(row["model"], "test", "overall", m)] = _iv(row.get(m))
    return out


@dataclass
class Row:
    """One compared value."""

    model: str
    setting: str
    site: str
    metric: str
    a: Value
    b: Value
    diff: float | None
    better: str | None  # "A", "B" or None (equal, or no direction for this metric)
    disjoint: bool | None  # both CIs known and not overlapping


def compare(
    a: dict[str, Any], b: dict[str, Any], metrics: list[str] | None = None, per_site: bool = False
) -> list[Row]:
    """Rows of both runs (overall/pooled and gap rows, plus per-site rows when `per_site`)."""
    fa, fb = flatten(a), flatten(b)
    rows = []
    for key in fa:
        if key not in fb:
            continue
        model, setting, site, metric = key
        if metrics and metric not in metrics and not (metric == "auc_diff" and "auc" in metrics):
            continue
        if not per_site and site not in ("overall", "mean_over_sites"):
            continue
        va, vb = fa[key], fb[key]
        diff = None if va.estimate is None or vb.estimate is None else vb.estimate - va.estimate
        better = None
        direction = HIGHER_IS_BETTER.get(metric)
        if setting == "gap":
            direction = False  # a smaller generalisation gap is better
        if diff is not None and diff != 0 and direction is not None:
            better = "B" if (diff > 0) == direction else "A"
        disjoint = None
        if None not in (va.lo, va.hi, vb.lo, vb.hi):
            disjoint = bool(va.hi < vb.lo or vb.hi < va.lo)  # type: ignore[operator]
        rows.append(Row(model, setting, site, metric, va, vb, diff, better, disjoint))
    if not rows:
        raise CompareError("the two runs share no comparable metric (different schemas, models or sites?)")
    return rows


def _cell(v: Value) -> str:
    if v.estimate is None:
        return "n/a"
    if v.lo is None or v.hi is None:
        return f"{v.estimate:.3f}"
    return f"{v.estimate:.3f} [{v.lo:.3f}, {v.hi:.3f}]"


def markdown(rows: list[Row], name_a: str, name_b: str) -> str:
    """A Markdown table of the rows."""
    lines = [
        f"A = {name_a}",
        f"B = {name_b}",
        "",
        "| model | setting | site | metric | A | B | B − A | better | CIs disjoint |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        diff = "n/a" if r.diff is None else f"{r.diff:+.3f}"
        disjoint = "" if r.disjoint is None else ("yes" if r.disjoint else "no")
        lines.append(
            f"| {r.model} | {r.setting} | {r.site} | {r.metric} | {_cell(r.a)} | {_cell(r.b)} | {diff} | "
            f"{r.better or ''} | {disjoint} |"
        )
    return "\n".join(lines)


def to_json(rows: list[Row], file_a: Path, file_b: Path) -> dict[str, Any]:
    """The comparison as a JSON document (schema `fedslide.compare/1`)."""
    return {"schema": "fedslide.compare/1", "a": str(file_a), "b": str(file_b), "rows": [asdict(r) for r in rows]}
