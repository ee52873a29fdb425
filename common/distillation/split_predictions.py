"""Per-slide test probabilities of every model of a `fedslide distill` run (`test_predictions.csv`).

Pooling slides over runs (e.g. the folds of a leave-one-site-out study) needs the slides' probabilities, not
each run's metrics: one row per (model, test slide), `prob_<class>` columns in the run's class order.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedslide.common.atomic import write_text_atomic
from fedslide.common.distillation.data import SlidePair
from fedslide.common.distillation.mil import slide_outputs
from fedslide.common.models.base import MILModel
from fedslide.common.training.data import Cohort

TEST_PREDICTIONS_FILE = "test_predictions.csv"
FIXED_COLUMNS = ("model", "site", "slide_id", "label")


class _Trained(Protocol):
    model: MILModel
    cohort: Cohort


def test_prediction_rows(
    trained: Mapping[str, _Trained], slides: Sequence[SlidePair], indices: np.ndarray, device: torch.device
) -> list[dict[str, str | float]]:
    """Rows (model, site, slide_id, label name, prob_<class>...) of every model on `slides[indices]` (the
    models' cohorts list the same slides in the same order)."""
    rows: list[dict[str, str | float]] = []
    for name, t in trained.items():
        logits, _ = slide_outputs(t.model, t.cohort, indices, device)
        probs = torch.softmax(logits.double(), dim=1).numpy()
        classes = t.cohort.classes
        for i, p in zip(indices.tolist(), probs):
            slide = slides[int(i)]
            row: dict[str, str | float] = {
                "model": name,
                "site": slide.site,
                "slide_id": slide.slide_id,
                "label": classes[int(slide.label)],
            }
            row.update({f"prob_{c}": float(v) for c, v in zip(classes, p)})
            rows.append(row)
    return rows


def write_test_predictions(path: Path, rows: list[dict[str, str | float]], classes: Sequence[str]) -> None:
    """Write the rows as CSV (header: FIXED_COLUMNS then prob_<class> in class order), atomically."""
    columns = [*FIXED_COLUMNS, *(f"prob_{c}" for c in classes)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    write_text_atomic(path, buffer.getvalue())


def read_test_predictions(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(class names from the header, rows as strings) of a test_predictions.csv."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        if columns[: len(FIXED_COLUMNS)] != list(FIXED_COLUMNS):
            raise ValueError(f"{path}: header {columns} does not start with {list(FIXED_COLUMNS)}")
        return [c.removeprefix("prob_") for c in columns[len(FIXED_COLUMNS) :]], list(reader)
