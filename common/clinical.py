"""A site's clinical table (`clinical.csv`): reading it against its schema, encoding it, and the federated
normalisation of the encoded vectors.

The table's first column is `slide_id` or `patient_id`; the other columns are those the schema
(`common.config.clinical.ClinicalConfig`) lists, in any order. A numeric cell must parse as a number within its
column's range; a categorical cell must be one of its column's values; a cell holding a missing token counts as
not recorded. A slide has the clinical modality when its row exists and records every column (a partly recorded
row counts as missing, so each slide either has the whole vector or none of it).

Encoding: a numeric column gives its value, a categorical column a one-hot block. The vectors are standardised
with statistics pooled from per-site sums, sums of squares and counts of the training slides that have the
modality, withheld as a whole when a site has fewer than suppress-below such slides (the rule of cluster
statistics; `site_clinical_sums`; on the wire: `common.federation.clinical_sums`). Clinical rows themselves never
leave a site. This module imports no Flower (the distill and predict commands read tables through it).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedslide.common.config.clinical import CategoricalVariable, ClinicalConfig, NumericVariable
from fedslide.common.training.standardize import FeatureStats, FeatureSums, pooled_stats

CLINICAL_FILE = "clinical.csv"
KeyColumn = Literal["slide_id", "patient_id"]
FillMode = Literal["zero", "mean"]


class ClinicalDataError(ValueError):
    """A clinical table cannot be used; the message names the file, row, column, value and what is allowed."""


@dataclass(frozen=True)
class ClinicalTable:
    """A site's clinical rows: ids (slide or patient, per `key`) and their raw encoded vectors (NaN: not recorded)."""

    key: KeyColumn
    ids: tuple[str, ...]
    raw: np.ndarray  # [rows, encoded_dim] float64; a row with any unrecorded column is all NaN

    def lookup(self, slide_ids: Sequence[str], patient_of: Mapping[str, str] | None = None) -> np.ndarray:
        """Raw vectors of `slide_ids` ([n, dim], all NaN where a slide has no complete row); a patient-keyed table
        needs `patient_of` (slide id -> patient id)."""
        index = {row_id: i for i, row_id in enumerate(self.ids)}
        out = np.full((len(slide_ids), self.raw.shape[1]), np.nan)
        for i, slide in enumerate(slide_ids):
            if self.key == "patient_id":
                if patient_of is None:
                    raise ClinicalDataError("the clinical table is keyed by patient_id; slides need their patient ids")
                row_id = patient_of.get(slide)
            else:
                row_id = slide
            if row_id is not None and row_id in index:
                out[i] = self.raw[index[row_id]]
        return out


def _allowed(variable: NumericVariable | CategoricalVariable) -> str:
    if isinstance(variable, NumericVariable):
        return f"a number in [{variable.min:g}, {variable.max:g}] {variable.unit}"
    return "one of " + ", ".join(repr(v) for v in variable.values)


def _encode_cell(text: str, variable: NumericVariable | CategoricalVariable) -> np.ndarray | None:
    """The cell's encoding, or None when it is not an allowed value."""
    if isinstance(variable, NumericVariable):
        try:
            value = float(text)
        except ValueError:
            return None
        if not math.isfinite(value) or not variable.min <= value <= variable.max:
            return None
        return np.array([value])
    if text not in variable.values:
        return None
    return np.eye(len(variable.values))[variable.values.index(text)]


def load_clinical(path: Path, cfg: ClinicalConfig, row_errors: dict[str, str] | None = None) -> ClinicalTable:
    """Read and check `path` against the schema of `cfg`; ClinicalDataError naming file, row (the line number),
    column, value and the allowed values for the first bad cell, or the header problem. With `row_errors` a bad
    row is left out and its message recorded under its id instead (header problems still raise)."""
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if not header or header[0] not in ("slide_id", "patient_id"):
            first = header[0] if header else ""
            raise ClinicalDataError(f"{path}: the first column is {first!r}; it must be 'slide_id' or 'patient_id'")
        names = [v.name for v in cfg.variables]
        unknown = [name for name in header[1:] if name not in names]
        missing = [name for name in names if name not in header[1:]]
        if unknown or missing or len(set(header)) != len(header):
            raise ClinicalDataError(
                f"{path}: columns {header[1:]} do not match the schema's {names} "
                f"(unknown: {unknown or 'none'}; missing: {missing or 'none'}; duplicated names are refused too)"
            )
        column_of = {name: header.index(name) for name in names}
        tokens = {token.lower() for token in cfg.missing_tokens}
        ids: list[str] = []
        rows: list[np.ndarray] = []
        for line, cells in enumerate(reader, start=2):
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                message = f"{path}, row {line}: {len(cells)} cells, the header has {len(header)}"
                if row_errors is None or not cells[0].strip():
                    raise ClinicalDataError(message)
                row_errors[cells[0].strip()] = message
                continue
            row_id = cells[0].strip()
            if not row_id or row_id in ids:
                what = "is empty" if not row_id else "appears twice"
                raise ClinicalDataError(f"{path}, row {line}, column {header[0]!r}: id {row_id!r} {what}")
            parts: list[np.ndarray] = []
            complete = True
            for variable in cfg.variables:
                text = cells[column_of[variable.name]].strip()
                if text.lower() in tokens:
                    complete = False
                    continue
                encoded = _encode_cell(text, variable)
                if encoded is None:
                    message = (
                        f"{path}, row {line}, column {variable.name!r}: value {text!r} is not allowed; "
                        f"allowed: {_allowed(variable)} (or a missing token: {cfg.missing_tokens})"
                    )
                    if row_errors is None:
                        raise ClinicalDataError(message)
                    row_errors[row_id] = message
                    break
                parts.append(encoded)
            if row_id in (row_errors or {}):
                continue
            ids.append(row_id)
            rows.append(np.concatenate(parts) if complete else np.full(cfg.encoded_dim, np.nan))
    raw = np.stack(rows) if rows else np.zeros((0, cfg.encoded_dim))
    return ClinicalTable(key=header[0], ids=tuple(ids), raw=raw)  # type: ignore[arg-type]


def load_site_clinical(site_dir: Path, cfg: ClinicalConfig) -> ClinicalTable | None:
    """The site's `clinical.csv`, or None when it has none."""
    path = Path(site_dir) / CLINICAL_FILE
    return load_clinical(path, cfg) if path.is_file() else None


def present_mask(raw: np.ndarray) -> np.ndarray:
    """[n] bool: which rows hold a complete clinical vector."""
    return np.isfinite(raw).all(axis=1) if raw.size else np.zeros(len(raw), dtype=bool)


def site_clinical_sums(raw: np.ndarray, min_slides: int = 0) -> FeatureSums:
    """What a site releases for the normalisation: sums and sums of squares of its complete training vectors and
    their count, all zero (withheld) when fewer than `min_slides` slides have the modality (cluster statistics'
    suppression, with every slide in one cluster)."""
    from fedslide.common.distillation.clustering import cluster_statistics  # lazy: it imports scikit-learn

    x = raw[present_mask(raw)].astype(np.float64)
    dim = raw.shape[1]
    rows = np.concatenate([x, np.square(x), np.ones((len(x), 1))], axis=1)
    totals, counts = cluster_statistics(
        rows, np.zeros((1, rows.shape[1])), min_count=min_slides, assignment=np.zeros(len(rows), dtype=np.int64)
    )
    return FeatureSums(totals[0, :dim], totals[0, dim : 2 * dim], int(counts[0]), int(counts[0]))


def pooled_clinical_stats(parts: Sequence[FeatureSums], min_slides: int = 0) -> FeatureStats:
    """The normalisation pooled from the sites' releases; a release of fewer than `min_slides` slides counts for
    nothing (the server's check of the suppression each site applied)."""
    return pooled_stats([part for part in parts if part.slides >= max(min_slides, 1)])


def encode(raw: np.ndarray, stats: FeatureStats, fill: FillMode = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(standardised vectors [n, dim] float32, present [n] bool). A missing vector is filled before the
    standardisation with zeros (`zero`: raw zeros, e.g. age 0) or after it with zeros (`mean`: the pooled mean)."""
    present = present_mask(raw)
    x = np.where(present[:, None], raw, 0.0)
    z = (x - stats.mean) / stats.std
    if fill == "mean":
        z[~present] = 0.0
    return z.astype(np.float32), present
