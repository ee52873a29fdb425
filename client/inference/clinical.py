"""`fedslide predict --clinical PATH`: slides with a complete clinical row are read by the bundle's bidirectional-
distillation model's multi-modal branch, the others by its single-modal branch (`clinical_branch` in
predictions.csv).

The table is read against the schema the bundle's BD model was trained with: different columns refuse the run
(naming both), a bad cell fails only the slides of its row (the message names file, row, column, value and what
is allowed; the other slides are predicted). Without a table, or with a bundle without a BD model, prediction is
the student's as always (the latter with a warning).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedslide.client.inference.slide import SlidePrediction
from fedslide.common.clinical import ClinicalDataError, ClinicalTable
from fedslide.common.config.predict import PredictConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.clinical_model import ClinicalModel

log = logging.getLogger(__name__)

BRANCH_COLUMN = "clinical_branch"


def read_patients(path: Path) -> dict[str, str]:
    """slide_id -> patient_id from a CSV with both columns (e.g. labels.csv); ClinicalDataError naming the file."""
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if "slide_id" not in fields or "patient_id" not in fields:
            raise ClinicalDataError(f"{path}: needs columns slide_id and patient_id; it has {fields}")
        patient_of: dict[str, str] = {}
        line_of: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            cells = {}
            for column in ("slide_id", "patient_id"):
                value = row.get(column)
                if value is None:  # a short row
                    raise ClinicalDataError(f"{path}, line {line}: column {column!r} is missing (the row is short)")
                cells[column] = value.strip()
            slide_id = cells["slide_id"]
            if slide_id in patient_of:
                raise ClinicalDataError(
                    f"{path}: slide_id {slide_id!r} is listed twice (lines {line_of[slide_id]} and {line}); "
                    "give each slide one patient"
                )
            patient_of[slide_id] = cells["patient_id"]
            line_of[slide_id] = line
        return patient_of


@dataclass
class ClinicalInput:
    """The bundle's BD model with the slides' clinical table (and, for a patient-keyed one, slide -> patient)."""

    model: ClinicalModel
    table: ClinicalTable
    row_errors: dict[str, str]
    patient_of: dict[str, str] | None
    path: Path
    patients_path: Path | None = None

    def warn_unlisted(self, slide_ids: list[str]) -> list[str]:
        """Log a WARNING naming the slides a patient-keyed table cannot reach (absent from the patients file; the
        single-modal branch reads them); returns them."""
        if self.patient_of is None or self.patients_path is None:
            return []
        missing = [s for s in slide_ids if s not in self.patient_of]
        if missing:
            log.warning(
                "%d slide(s) are not in the patients file %s, so they get no clinical row (single-modal branch): %s",
                len(missing),
                self.patients_path,
                ", ".join(missing),
            )
        return missing

    def raw(self, slide_id: str) -> np.ndarray:
        """The slide's raw clinical vector (NaN: not recorded); ClinicalDataError when its row was refused."""
        row_id = slide_id
        if self.table.key == "patient_id":
            assert self.patient_of is not None
            row_id = self.patient_of.get(slide_id, "")
        if row_id in self.row_errors:
            raise ClinicalDataError(f"slide {slide_id}: {self.row_errors[row_id]}")
        return self.table.lookup([slide_id], self.patient_of)[0]

    def apply(self, pred: SlidePrediction, bundle: StudentBundle) -> None:
        """Replace the student's probabilities of `pred` (predicted with its low-res arrays kept) with the BD
        model's, and record the branch that read the slide."""
        arrays = pred.low_pass
        if arrays is None:
            raise ValueError(f"slide {pred.slide_id}: the clinical model needs the slide's low-res features")
        tokens = None if arrays.tokens is None else torch.from_numpy(arrays.tokens)
        instances = bundle.student_instances(torch.from_numpy(arrays.features), tokens)[0]
        probs, branch = self.model.predict(instances, self.raw(pred.slide_id))
        pred.probs = probs.numpy().astype(np.float64)
        pred.label = pred.class_names[int(np.argmax(pred.probs))]
        pred.clinical_branch = branch


def clinical_input(bundle: StudentBundle, cfg: PredictConfig) -> ClinicalInput | None:
    """The run's clinical input, or None (no table; a bundle without a BD model; reference mode). Raises
    ClinicalSchemaError when the table's columns differ from the BD model's schema, ClinicalDataError for a
    patient-keyed table without `clinical_patients`."""
    if cfg.clinical is None:
        return None
    if bundle.clinical is None:
        log.warning("%s: the bundle has no clinical (BD) model; predicting with the student alone", cfg.clinical)
        return None
    if cfg.resolution == "high":
        log.warning("--resolution high runs the teacher; the clinical table %s is not used", cfg.clinical)
        return None
    path = Path(cfg.clinical)
    errors: dict[str, str] = {}
    table = bundle.clinical.read_table(path, errors)
    patient_of = None
    if table.key == "patient_id":
        if cfg.clinical_patients is None:
            raise ClinicalDataError(
                f"{path} is keyed by patient_id; give a CSV with slide_id and patient_id columns (e.g. the site's "
                "labels.csv) as clinical-patients / --clinical-patients"
            )
        patient_of = read_patients(Path(cfg.clinical_patients))
    for row_id, message in errors.items():
        log.error("clinical row %s refused: %s", row_id, message)
    patients_path = None if cfg.clinical_patients is None else Path(cfg.clinical_patients)
    return ClinicalInput(bundle.clinical, table, errors, patient_of, path, patients_path)
