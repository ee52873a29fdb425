"""The labels CSV: `slide_id,label[,split][,patient_id]` -> slides with class indices."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedslide.common.training.errors import LabelsError

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_PATIENT_COLUMNS = ("patient_id", "case_id")  # CLAM's CSVs name the patient `case_id`


@dataclass(frozen=True)
class SlideLabel:
    """One row of the labels CSV (patient_id falls back to slide_id)."""

    slide_id: str
    label: str
    patient_id: str
    split: str | None


@dataclass(frozen=True)
class LabelTable:
    """All rows of a labels CSV and the sorted class names (class index = position)."""

    path: Path
    rows: tuple[SlideLabel, ...]
    classes: tuple[str, ...]
    has_split: bool
    has_patient: bool

    @property
    def label_map(self) -> dict[str, int]:
        """Class name -> class index."""
        return {name: i for i, name in enumerate(self.classes)}


def class_order(labels: Iterable[str]) -> tuple[str, ...]:
    """The class order (class index = position) of labels without a configured class list: numeric labels sort
    by value (2 before 10), anything else alphabetically. Every place that derives a label map uses this."""
    names = set(labels)
    try:
        values = {name: float(name) for name in names}
    except ValueError:
        return tuple(sorted(names))
    if any(math.isnan(v) for v in values.values()):
        return tuple(sorted(names))
    return tuple(sorted(names, key=lambda name: (values[name], name)))


def _lines(items: list[str]) -> str:
    return ", ".join(items)


def read_labels(path: Path | str, classes: Sequence[str] | None = None) -> LabelTable:
    """Parse and check the labels CSV; every problem found is reported at once, naming lines and ids.

    `classes`: the label map (class index = position) from the config or the federation; a label outside it is an
    error naming the line, the slide, the value and the allowed names. Without it the classes are the sorted labels.
    """
    path = Path(path)
    allowed = None if classes is None else tuple(str(c) for c in classes)
    if allowed is not None and (len(allowed) < 2 or len(set(allowed)) != len(allowed) or "" in allowed):
        raise LabelsError(f"labels file {path}: the class list {list(allowed)} needs two or more distinct names")
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing_cols = [c for c in ("slide_id", "label") if c not in columns]
        if missing_cols:
            raise LabelsError(
                f"labels file {path}: missing column(s) {', '.join(missing_cols)}; found columns: "
                f"{', '.join(columns) or '(none)'}; expected slide_id,label[,split][,patient_id]"
            )
        patient_col = next((c for c in _PATIENT_COLUMNS if c in columns), None)
        has_split = "split" in columns
        raw_rows = [({(k or "").strip(): (v or "").strip() for k, v in row.items()}, reader.line_num) for row in reader]

    problems: list[str] = []
    rows: list[SlideLabel] = []
    seen: dict[str, int] = {}
    duplicates: list[str] = []
    for row, line in raw_rows:
        slide_id, label = row.get("slide_id", ""), row.get("label", "")
        if not slide_id and not label and not any(row.values()):
            continue  # blank line
        if not slide_id:
            problems.append(f"line {line}: empty slide_id")
            continue
        if not label:
            problems.append(f"line {line}: slide {slide_id!r} has an empty label")
            continue
        if allowed is not None and label not in allowed:
            problems.append(f"line {line}: slide {slide_id!r} has label {label!r}; allowed: {', '.join(allowed)}")
            continue
        if slide_id in seen:
            duplicates.append(f"{slide_id!r} (lines {seen[slide_id]} and {line})")
            continue
        seen[slide_id] = line
        split = None
        if has_split:
            split = _SPLIT_ALIASES.get(row.get("split", "").lower())
            if split is None:
                problems.append(
                    f"line {line}: slide {slide_id!r} has split {row.get('split', '')!r}; allowed: {', '.join(SPLIT_NAMES)}"
                )
                continue
        patient = (row.get(patient_col, "") if patient_col else "") or slide_id
        rows.append(SlideLabel(slide_id=slide_id, label=label, patient_id=patient, split=split))
    if duplicates:
        problems.append(f"duplicate slide_id(s): {_lines(duplicates)}")
    if problems:
        raise LabelsError(f"labels file {path}:\n  " + "\n  ".join(problems))
    if not rows:
        raise LabelsError(f"labels file {path} has no slides")
    classes = allowed if allowed is not None else class_order(r.label for r in rows)
    if len(classes) < 2:
        raise LabelsError(f"labels file {path}: only one class ({classes[0]!r}); classification needs at least two")
    return LabelTable(
        path=path, rows=tuple(rows), classes=classes, has_split=has_split, has_patient=patient_col is not None
    )
