"""Synthetic clinical tables: variables with real but partial signal about the label, and per-site missingness.

One row per patient (`patient_id`, then the columns of the default schema, `common.config.clinical`):
- age (years): N(56, 11) for normal, N(63, 11) for tumour patients, clipped to [18, 100];
- tumour_size (mm): log-normal, median 12 mm (normal: a benign lesion) vs 18 mm (tumour), spread 0.5;
- grade: 1/2/3 with probabilities 0.5/0.3/0.2 (normal) vs 0.2/0.35/0.45 (tumour);
- er_status: positive with probability 0.7 whatever the label (no signal: a nuisance column).
Each variable alone separates the classes weakly (AUC about 0.6-0.7); together about 0.8. A missing patient
(round(missingness × patients), drawn at random) has a row of `NA` cells.

More than two classes (`fedslide synth --set task=subtyping`: normal / benign / carcinoma, in that order): the
signal grows with the class index. Class k of C has severity s = k / (C - 1) and draws from the normal (s = 0) and
tumour (s = 1) parameters interpolated at s: age mean 56 + 7 s, median size 12 × 1.5^s mm, grade probabilities
(1 - s) × normal's + s × tumour's (benign: age 59.5, 14.7 mm, grades 0.35/0.325/0.325). Two classes are s = 0 and 1:
the binary rule above, draw for draw.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

AGE_MEAN = (56.0, 63.0)
AGE_SD = 11.0
SIZE_MEDIAN_MM = (12.0, 18.0)
SIZE_LOG_SD = 0.5
GRADE_PROBS = ((0.5, 0.3, 0.2), (0.2, 0.35, 0.45))
ER_POSITIVE = 0.7
COLUMNS = ("age", "tumour_size", "grade", "er_status")
MISSING = "NA"


def class_parameters(label: int, num_classes: int = 2) -> tuple[float, float, np.ndarray]:
    """(age mean, median tumour size in mm, grade probabilities) of class `label` of `num_classes`, ordered by
    severity (module doc): normal's at class 0, tumour's at the last class, interpolated between."""
    if num_classes < 2 or not 0 <= label < num_classes:
        raise ValueError(f"clinical class {label} of {num_classes}: needs 2+ classes and 0 <= label < {num_classes}")
    s = label / (num_classes - 1)
    age = (1.0 - s) * AGE_MEAN[0] + s * AGE_MEAN[1]
    size = SIZE_MEDIAN_MM[0] * (SIZE_MEDIAN_MM[1] / SIZE_MEDIAN_MM[0]) ** s
    grade = (1.0 - s) * np.asarray(GRADE_PROBS[0]) + s * np.asarray(GRADE_PROBS[1])
    return age, size, grade


def clinical_rows(
    labels: Sequence[int], missingness: float, rng: np.random.Generator, num_classes: int = 2
) -> list[list[str]]:
    """One row of cells (COLUMNS order) per label (class index by severity: 0 normal, num_classes - 1 tumour);
    round(missingness × n) rows are all NA."""
    if not 0.0 <= missingness <= 1.0:
        raise ValueError(f"missingness must be in [0, 1], got {missingness}")
    n = len(labels)
    missing = np.zeros(n, dtype=bool)
    missing[rng.permutation(n)[: int(round(missingness * n))]] = True
    rows: list[list[str]] = []
    for label, absent in zip(labels, missing):
        age_mean, size_median, grade_probs = class_parameters(int(label), num_classes)
        age = float(np.clip(rng.normal(age_mean, AGE_SD), 18.0, 100.0))
        size = float(np.clip(rng.lognormal(np.log(size_median), SIZE_LOG_SD), 0.5, 200.0))
        grade = str(rng.choice(3, p=grade_probs) + 1)
        er = "positive" if rng.random() < ER_POSITIVE else "negative"
        rows.append([MISSING] * len(COLUMNS) if absent else [f"{age:.0f}", f"{size:.1f}", grade, er])
    return rows


def write_clinical(
    path: Path,
    ids: Sequence[str],
    labels: Sequence[int],
    missingness: float,
    rng: np.random.Generator,
    key: str,
    num_classes: int = 2,
) -> None:
    """Write `path` (clinical.csv) keyed by `key` (slide_id or patient_id), one row per id."""
    rows = clinical_rows(labels, missingness, rng, num_classes)
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key, *COLUMNS])
        for row_id, row in zip(ids, rows):
            writer.writerow([row_id, *row])


def write_site_clinical(
    site_dir: Path,
    patients: Sequence[str],
    labels: Sequence[str],
    missingness: float,
    seed: Sequence[int],
    classes: Sequence[str] = ("normal", "tumor"),
) -> None:
    """The synth cohort's hook: one row per patient of the site (its slides share one label), `labels` per patient,
    by their index in the task's `classes` (severity order, normal first; module doc), drawn from
    SeedSequence(`seed`)."""
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"clinical labels {unknown} are not among the task's classes {list(classes)}")
    rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
    write_clinical(
        Path(site_dir) / "clinical.csv",
        patients,
        [list(classes).index(label) for label in labels],
        missingness,
        rng,
        "patient_id",
        len(classes),
    )
