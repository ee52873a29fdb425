"""The LOSO report's clinical-missingness table: per held-out site, its federated BD model's AUC with 0 / 50 / 80 /
100 % of its clinical rows removed (`deploy.study.clinical_missingness` writes the folds' entries)."""

from __future__ import annotations

from typing import Any

LEVELS = ("0", "50", "80", "100")


def clinical_table(folds: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the folds that have a `federated.clinical_missingness` entry (no rows: no such fold)."""
    rows = []
    for held, info in sorted(folds.items()):
        column = (info.get("federated") or {}).get("clinical_missingness")
        if not column:
            continue
        auc = column.get("auc", {})
        cells = ["–" if auc.get(k) is None else f"{auc[k]:.3f}" for k in LEVELS]
        rows.append([held, f"{column.get('with_clinical', 0)} / {column.get('n', 0)}", *cells])
    header = ["held-out site", "slides with clinical data", *(f"BD AUC, {k} % removed" for k in LEVELS)]
    return header, rows
