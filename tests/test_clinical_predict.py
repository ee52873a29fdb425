"""`fedslide predict --clinical`: slides with a complete clinical row go through the bundle's multi-modal BD branch,
the others through its single-modal branch; schema errors are refused or fail only their slides."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslide.client.encoders import PatchEncoder, build_encoder
from fedslide.client.inference.clinical import ClinicalInput, clinical_input
from fedslide.client.predict_cli import add_parser
from fedslide.client.synth.slide import write_slide
from fedslide.common.clinical import ClinicalDataError
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.preprocess import EncoderConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.clinical_model import ClinicalModel, ClinicalSchemaError
from fedslide.common.models.bimodal import BidirectionalMIL
from fedslide.common.training.standardize import FeatureStats
from tests.feature_sites import tiny_student_bundle

CLASSES = ["normal", "tumor"]
HEADER = ["slide_id", "age", "tumour_size", "grade", "er_status"]


def _clinical_model(in_dim: int) -> ClinicalModel:
    cfg = ClinicalConfig(hidden_dim=8, attention_dim=4)
    torch.manual_seed(1)
    model = BidirectionalMIL(in_dim, cfg.encoded_dim, len(CLASSES), 8, 4, 0.0)
    stats = FeatureStats(
        np.array([60, 15, 0.3, 0.3, 0.3, 0.3, 0.7], np.float32), np.array([10, 5, 1, 1, 1, 1, 1], np.float32), 20
    )
    return ClinicalModel(model.eval(), cfg, stats, in_dim, len(CLASSES))


def _table(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedslide")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def _predictions(out: Path) -> dict[str, dict[str, str]]:
    with (out / "predictions.csv").open() as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def encoder() -> PatchEncoder:
    return build_encoder(EncoderConfig())


@pytest.fixture(scope="module")
def setup(encoder: PatchEncoder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(slides folder with g20 and a40, a bundle with a BD model, the same bundle without one)."""
    root = tmp_path_factory.mktemp("clinical_predict")
    slides = root / "slides"
    slides.mkdir()
    write_slide(slides / "g20.tif", 1000, 1000, 0.5, "generic", seed=3, tumor=True, tumor_fraction=0.4)
    write_slide(slides / "a40.svs", 1000, 1000, 0.25, "aperio", seed=4)
    plain = tiny_student_bundle(encoder, CLASSES, "pooled")
    plain.save(root / "plain")
    plain.clinical = _clinical_model(encoder.dim)
    plain.save(root / "bd")
    return slides, root / "bd", root / "plain"


def _argv(slides: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--slides",
        str(slides),
        "--model",
        str(model),
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-progress",
        "--no-heatmaps",
        *extra,
    ]


@pytest.mark.slow
def test_predict_routes_each_slide_by_its_clinical_row(
    setup: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slides, bd, plain = setup
    table = _table(tmp_path / "clinical.csv", [["g20", "70", "20", "3", "positive"], ["a40", "NA", "NA", "NA", "NA"]])
    assert _cli(_argv(slides, bd, tmp_path / "out", "--clinical", str(table))) == 0
    rows = _predictions(tmp_path / "out")
    assert {k: r["clinical_branch"] for k, r in rows.items()} == {"g20": "multi", "a40": "single"}

    # without a table: the student alone, as before (no branch column)
    assert _cli(_argv(slides, bd, tmp_path / "student")) == 0
    student = _predictions(tmp_path / "student")
    assert "clinical_branch" not in student["g20"]
    assert student["g20"]["prob_tumor"] != rows["g20"]["prob_tumor"]  # the BD model, not the student, read it

    # a40's row completed: it moves to the multi-modal branch and its prediction changes; g20's row changed too
    table = _table(
        tmp_path / "clinical.csv", [["g20", "30", "5", "1", "negative"], ["a40", "70", "20", "3", "positive"]]
    )
    assert _cli(_argv(slides, bd, tmp_path / "out2", "--clinical", str(table))) == 0
    again = _predictions(tmp_path / "out2")
    assert again["a40"]["clinical_branch"] == "multi" and again["a40"]["prob_tumor"] != rows["a40"]["prob_tumor"]
    assert again["g20"]["prob_tumor"] != rows["g20"]["prob_tumor"]

    # a bundle without a BD model predicts as today, with a warning
    with caplog.at_level(logging.WARNING):
        assert _cli(_argv(slides, plain, tmp_path / "plain", "--clinical", str(table))) == 0
    assert "has no clinical (BD) model" in caplog.text
    assert _predictions(tmp_path / "plain")["g20"]["prob_tumor"] == student["g20"]["prob_tumor"]


@pytest.mark.slow
def test_a_bad_clinical_cell_fails_only_its_slide(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slides, bd, _ = setup
    table = _table(
        tmp_path / "clinical.csv", [["g20", "70", "20", "7", "positive"], ["a40", "60", "9", "2", "negative"]]
    )
    assert _cli(_argv(slides, bd, tmp_path / "out", "--clinical", str(table))) == 3
    with (tmp_path / "out" / "failures.csv").open() as handle:
        failures = {row["slide_id"]: row["reason"] for row in csv.DictReader(handle)}
    assert set(failures) == {"g20"}
    assert (
        "clinical.csv, row 2, column 'grade': value '7' is not allowed; allowed: one of '1', '2', '3'"
        in (failures["g20"])
    )
    assert _predictions(tmp_path / "out")["a40"]["clinical_branch"] == "multi"


def test_a_table_of_another_schema_refuses_the_run_naming_both(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slides, bd, _ = setup
    table = _table(tmp_path / "clinical.csv", [["g20", "70", "pos"]], header=["slide_id", "age", "her2"])
    assert _cli(_argv(slides, bd, tmp_path / "out", "--clinical", str(table))) == 2
    err = capsys.readouterr().err
    assert "['age', 'her2']" in err and "['age', 'tumour_size', 'grade', 'er_status']" in err
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_a_patient_keyed_table_reads_slides_through_the_patient_list(tmp_path: Path) -> None:
    model = _clinical_model(16)
    bundle = StudentBundle.__new__(StudentBundle)
    bundle.clinical = model
    table = _table(
        tmp_path / "clinical.csv",
        [["p1", "70", "20", "3", "positive"], ["p2", "NA", "NA", "NA", "NA"]],
        header=["patient_id", *HEADER[1:]],
    )
    cfg = PredictConfig(clinical=table)
    with pytest.raises(ClinicalDataError, match="keyed by patient_id.*--clinical-patients"):
        clinical_input(bundle, cfg)
    patients = _table(tmp_path / "labels.csv", [["s1", "p1"], ["s2", "p1"], ["s3", "p2"]], ["slide_id", "patient_id"])
    found = clinical_input(bundle, PredictConfig(clinical=table, clinical_patients=patients))
    assert isinstance(found, ClinicalInput)
    assert np.isfinite(found.raw("s1")).all() and np.array_equal(found.raw("s1"), found.raw("s2"))
    assert np.isnan(found.raw("s3")).all() and np.isnan(found.raw("unknown")).all()
    x = torch.randn(4, 16)
    assert model.predict(x, found.raw("s1"))[1] == "multi" and model.predict(x, found.raw("s3"))[1] == "single"
    with pytest.raises(ClinicalSchemaError):
        model.read_table(_table(tmp_path / "bad.csv", [["p1", "1"]], header=["patient_id", "age"]))
