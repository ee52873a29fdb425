"""`--clinical-patients`: the slide -> patient file is read strictly (short rows, duplicate slides) and slides it
does not list are named in a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedslide.client.inference.clinical import clinical_input, read_patients
from fedslide.common.clinical import ClinicalDataError
from fedslide.common.config.predict import PredictConfig
from fedslide.common.distillation.bundle import StudentBundle
from tests.test_clinical_predict import HEADER, _clinical_model, _table


def test_a_short_row_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,patient_id\ns1,p1\ns2\n")
    with pytest.raises(ClinicalDataError, match=r"labels\.csv, line 3: column 'patient_id' is missing"):
        read_patients(path)


def test_a_slide_listed_twice_names_both_lines(tmp_path: Path) -> None:
    path = _table(tmp_path / "labels.csv", [["s1", "p1"], ["s2", "p2"], ["s1", "p3"]], ["slide_id", "patient_id"])
    with pytest.raises(ClinicalDataError, match=r"labels\.csv: slide_id 's1' is listed twice \(lines 2 and 4\)"):
        read_patients(path)
    assert read_patients(_table(tmp_path / "ok.csv", [[" s1 ", "p1"]], ["slide_id", "patient_id"])) == {"s1": "p1"}


def test_slides_missing_from_the_patients_file_are_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = StudentBundle.__new__(StudentBundle)
    bundle.clinical = _clinical_model(16)
    table = _table(tmp_path / "clinical.csv", [["p1", "70", "20", "3", "positive"]], ["patient_id", *HEADER[1:]])
    patients = _table(tmp_path / "labels.csv", [["s1", "p1"]], ["slide_id", "patient_id"])
    found = clinical_input(bundle, PredictConfig(clinical=table, clinical_patients=patients))
    assert found is not None
    with caplog.at_level(logging.WARNING, logger="fedslide.client.inference.clinical"):
        assert found.warn_unlisted(["s1", "s7", "s9"]) == ["s7", "s9"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "s7, s9" in warned[0] and str(patients) in warned[0] and "s1," not in warned[0]
    assert np.isnan(found.raw("s7")).all()
    caplog.clear()
    found.warn_unlisted(["s1"])
    assert not caplog.records
