"""The BD (slide + clinical) model inside the product: `fedslide distill --clinical` trains it into the student
bundle, which carries its schema and normalisation and checks them on load."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.clinical_model import CLINICAL_MODEL_FILE, ClinicalModel, ClinicalSchemaError
from fedslide.common.distillation.data import load_sites
from fedslide.common.clinical import ClinicalDataError
from fedslide.common.metrics import classification_metrics
from tests.feature_sites import make_site

SMALL = [
    "adapter.hidden-dim=32",
    "adapter.epochs=2",
    "adapter.batch-size=64",
    "teacher.hidden-dim=16",
    "teacher.attention-dim=8",
    "student.hidden-dim=16",
    "student.attention-dim=8",
    "training.epochs=2",
    "training.batch-size=2",
    "training.early-stopping-patience=0",
    "kd.lambda-expert=0",
    "device=cpu",
]
CLINICAL_TOML = """
[clinical]
hidden-dim = 8
attention-dim = 8
epochs = 3
batch-size = 4
"""
HEADER = ["patient_id", "age", "tumour_size", "grade", "er_status"]


def _write_clinical(site: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path = site / "clinical.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _site_rows(site: Path, missing_every: int = 0) -> list[list[str]]:
    """One row per patient of the site's labels.csv: age carries the label; every `missing_every`-th row is NA."""
    with (site / "labels.csv").open(newline="") as handle:
        labels = list(csv.DictReader(handle))
    rows = []
    for i, row in enumerate(labels):
        if missing_every and i % missing_every == 0:
            rows.append([row["patient_id"], "NA", "NA", "NA", "NA"])
        else:
            age = "75" if row["label"] == "pos" else "40"
            rows.append([row["patient_id"], age, "12.5", "2", "positive"])
    return rows


def _run(sites: list[Path], out: Path, config: Path, clinical: bool = True) -> int:
    from fedslide.common.distillation.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["distill", "--sites", *map(str, sites), "--out", str(out), "--no-progress", "--config", str(config)]
    argv += ["--clinical"] if clinical else []
    for item in SMALL:
        argv += ["--set", item]
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture()
def sites(tmp_path: Path) -> list[Path]:
    """Two sites: site0 with a clinical table (one patient in three missing), site1 without one."""
    made = [make_site(tmp_path, f"site{i}", {"train": 6, "val": 2, "test": 4}, seed=30 + i) for i in range(2)]
    _write_clinical(made[0], _site_rows(made[0], missing_every=3))
    return made


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "clinical.toml"
    path.write_text(CLINICAL_TOML)
    return path


@pytest.mark.slow
def test_distill_trains_the_bd_model_into_the_student_bundle(tmp_path: Path, sites: list[Path], config: Path) -> None:
    out = tmp_path / "run"
    assert _run(sites, out, config) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    info = metrics["clinical"]
    assert info["used"] and info["columns"] == ["age", "tumour_size", "grade", "er_status"]
    assert info["sites_with_table"] == ["site0"]
    assert info["train_slides"] == 12 and info["train_with_clinical"] == 4  # site0: 6 train slides, 2 missing
    assert info["test"]["with_clinical"] == 3 and info["test_without_clinical"]["with_clinical"] == 0
    # the epoch was selected on the run's val slides (2 per site), read as at inference
    assert info["selection"] == "validation auc" and info["val_slides"] == 4 and 1 <= info["epoch"] <= 3
    assert 0.0 <= info["val_auc"] <= 1.0 and info["val_with_clinical"] <= 2
    rows = {row["model"]: row for row in metrics["rows"]}
    assert isinstance(rows["bd_clinical"]["auc"], float) and isinstance(rows["bd_no_clinical"]["auc"], float)

    bundle = StudentBundle.load(out / "student")
    assert bundle.clinical is not None and bundle.clinical.cfg.hidden_dim == 8
    assert not (out / "lrmil_student" / CLINICAL_MODEL_FILE).exists()  # only the main bundle carries it
    # the bundle reproduces the stage's test metrics from the raw 5x files and the site's clinical table
    table = bundle.clinical.read_table(sites[0] / "clinical.csv")
    data = load_sites(sites)
    labels, probs, branches = [], [], []
    for i in data.split("test"):
        s = data.slides[i]
        instances = bundle.student_instances(torch.from_numpy(s.low.features), torch.from_numpy(s.low.tokens))[0]
        patient = s.patient_id.removeprefix(f"{s.site}/")
        raw = table.lookup([s.slide_id], {s.slide_id: patient})[0] if s.site == "site0" else None
        p, branch = bundle.clinical.predict(instances, raw)
        labels.append(s.label)
        probs.append(p.double().numpy())
        branches.append(branch)
    assert branches.count("multi") == 3 and branches.count("single") == 5
    got = classification_metrics(np.array(labels), np.stack(probs))
    assert got["brier"] == pytest.approx(info["test"]["brier"], rel=1e-5, abs=1e-7)


def test_distill_without_clinical_rows_is_refused_before_training(
    tmp_path: Path, sites: list[Path], config: Path
) -> None:
    _write_clinical(sites[0], [[r[0], "NA", "NA", "NA", "NA"] for r in _site_rows(sites[0])])
    assert _run(sites, tmp_path / "run", config) == 2
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_bad_clinical_cell_stops_distill_naming_file_row_and_column(
    tmp_path: Path, sites: list[Path], config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _site_rows(sites[0])
    rows[2][1] = "130"
    _write_clinical(sites[0], rows)
    assert _run(sites, tmp_path / "run", config) == 2
    err = capsys.readouterr().err
    assert "clinical.csv, row 4, column 'age': value '130' is not allowed" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def _tiny_bundle_model(tmp_path: Path) -> tuple[ClinicalModel, Path]:
    from fedslide.common.config.clinical import ClinicalConfig
    from fedslide.common.models.bimodal import BidirectionalMIL
    from fedslide.common.training.standardize import FeatureStats

    cfg = ClinicalConfig(hidden_dim=8, attention_dim=4)
    torch.manual_seed(0)
    model = BidirectionalMIL(16, cfg.encoded_dim, 2, 8, 4, 0.0)
    dim = cfg.encoded_dim
    stats = FeatureStats(np.zeros(dim, np.float32), np.ones(dim, np.float32), 10)
    path = tmp_path / CLINICAL_MODEL_FILE
    ClinicalModel(model.eval(), cfg, stats, 16, 2).save(path)
    return ClinicalModel.load(path), path


def test_bd_model_file_round_trips_and_routes_by_clinical_presence(tmp_path: Path) -> None:
    model, _ = _tiny_bundle_model(tmp_path)
    x = torch.randn(5, 16)
    complete = np.array([60.0, 10.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    p_multi, branch = model.predict(x, complete)
    p_none, none_branch = model.predict(x, None)
    p_part, part_branch = model.predict(x, np.where(np.arange(7) == 0, np.nan, complete))
    assert (branch, none_branch, part_branch) == ("multi", "single", "single")
    assert torch.allclose(p_none, p_part) and not torch.allclose(p_multi, p_none)
    other = complete.copy()
    other[0] = 90.0
    assert not torch.allclose(model.predict(x, other)[0], p_multi)  # the multi branch reads the clinical row


def test_bd_model_file_with_wrong_stats_or_bundle_shape_is_refused(tmp_path: Path) -> None:
    model, path = _tiny_bundle_model(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["stats"]["mean"] = torch.zeros(3)
    payload["stats"]["std"] = torch.ones(3)
    torch.save(payload, path)
    with pytest.raises(
        ValueError, match=r"clinical\.pt: normalisation statistics of shape \(3,\); its schema encodes 7"
    ):
        ClinicalModel.load(path)
    with pytest.raises(
        ValueError, match="BD model reads 16-d instances with 2 classes, but the bundle's student reads 32"
    ):
        model.check_bundle(path, 32, 2)


def test_a_table_with_another_schema_is_refused_naming_both(tmp_path: Path) -> None:
    model, _ = _tiny_bundle_model(tmp_path)
    path = _write_clinical(tmp_path, [["p1", "60", "HER2+"]], header=["patient_id", "age", "her2"])
    with pytest.raises(ClinicalSchemaError) as err:
        model.read_table(path)
    text = str(err.value)
    assert "['age', 'her2']" in text and "['age', 'tumour_size', 'grade', 'er_status']" in text and "her2" in text
    good = _write_clinical(tmp_path, [["p1", "60", "12", "4", "positive"]])
    with pytest.raises(ClinicalDataError, match=r"row 2, column 'grade': value '4' is not allowed"):
        model.read_table(good)
