"""Sites whose labels.csv has no split column: one carving rule (stratified, by patient, seeded, kept in
`<site>/splits.csv`) for distill, federate (at each site) and evaluate; refusals come before any training."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fedslide.client.client_app import app as client_app
from fedslide.common.config.base import ConfigError
from fedslide.common.config.distill import DistillConfig
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.splits import SplitCarving
from fedslide.common.distillation.data import load_sites
from fedslide.common.distillation.pipeline import run_distill
from fedslide.common.evaluation.predictions import missing_predictions_cause
from fedslide.common.training.errors import LabelsError, SplitError
from fedslide.common.training.splits import SPLITS_FILE, carve_splits
from fedslide.deploy.study.loso import run_study
from fedslide.server.local_grid import LocalGrid
from fedslide.server.server_app import run
from tests.feature_sites import make_site
from tests.test_evaluation import ONE_ROUND, TINY, tiny_study

CARVE_LOG = "fedslide.common.training.splits"


def unsplit_site(root: Path, name: str, n: int, seed: int, patients: int | None = None) -> Path:
    """A tiny site of `n` slides whose labels.csv has no split column (classes alternate); with
    `patients`, slide i belongs to patient i % patients (slides of one patient share its class)."""
    site = make_site(root, name, {"train": n}, seed=seed)
    with (site / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (site / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label"] + (["patient_id"] if patients else []))
        for i, row in enumerate(rows):
            p = i % patients if patients else i
            writer.writerow([row["slide_id"], ["neg", "pos"][p % 2]] + ([f"{name}-P{p}"] if patients else []))
    return site


def splits_of(site: Path) -> dict[str, str]:
    with (site / SPLITS_FILE).open(newline="") as handle:
        return {row["slide_id"]: row["split"] for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The issue's cohort: three sites of 12 labelled slides each, no split column."""
    root = tmp_path_factory.mktemp("unsplit")
    return [unsplit_site(root, f"site_{c}", 12, seed=40 + i) for i, c in enumerate("abc")]


# ---- the rule ----------------------------------------------------------------------------------------------
def test_carving_is_stratified_printed_written_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = unsplit_site(tmp_path, "A", 12, seed=1)
    with caplog.at_level(logging.INFO, logger=CARVE_LOG):
        data = load_sites([site])
    carved = {s.slide_id: s.split for s in data.slides}
    assert splits_of(site) == carved
    counts = {sp: [data.classes[s.label] for s in data.slides if s.split == sp] for sp in ("train", "val", "test")}
    assert {sp: (c.count("neg"), c.count("pos")) for sp, c in counts.items()} == {
        "train": (4, 4),
        "val": (1, 1),
        "test": (1, 1),
    }
    assert "carved train/val/test" in caplog.text
    assert "train 8 (neg 4, pos 4), val 2 (neg 1, pos 1), test 2 (neg 1, pos 1)" in caplog.text
    assert f"written to {site / SPLITS_FILE}" in caplog.text

    caplog.clear()
    before = (site / SPLITS_FILE).stat().st_mtime_ns
    with caplog.at_level(logging.DEBUG, logger=CARVE_LOG):
        again = load_sites([site], carving=SplitCarving(seed=7))  # the file wins over a new seed: reused as is
    assert {s.slide_id: s.split for s in again.slides} == carved
    assert (site / SPLITS_FILE).stat().st_mtime_ns == before and "splits from" in caplog.text

    (site / SPLITS_FILE).unlink()  # carved again from scratch: the same split (deterministic)
    assert {s.slide_id: s.split for s in load_sites([site]).slides} == carved
    (site / SPLITS_FILE).unlink()
    assert {s.slide_id: s.split for s in load_sites([site], carving=SplitCarving(seed=7)).slides} != carved
    assert not list(site.glob(f".{SPLITS_FILE}*"))  # no temp file left behind


def test_carving_keeps_each_patient_in_one_split(tmp_path: Path) -> None:
    site = unsplit_site(tmp_path, "B", 30, seed=2, patients=15)  # 2 slides per patient
    data = load_sites([site])
    by_patient: dict[str, set[str]] = {}
    for s in data.slides:
        by_patient.setdefault(s.patient_id, set()).add(s.split)
    assert all(len(splits) == 1 for splits in by_patient.values())
    for split in ("train", "val", "test"):
        assert {s.label for s in data.slides if s.split == split} == {0, 1}


def test_no_test_split_only_when_asked(tmp_path: Path) -> None:
    site = unsplit_site(tmp_path, "C", 12, seed=3)
    data = load_sites([site], carving=SplitCarving(test_fraction=0))
    assert not data.split("test").size and data.split("val").size
    with pytest.raises(SplitError, match=r"no test split but carve.test-fraction = 0.2; delete it"):
        load_sites([site])  # the kept file no longer fits the settings: said so, not silently used


def test_kept_splits_file_must_fit_the_labels(tmp_path: Path) -> None:
    site = unsplit_site(tmp_path, "D", 12, seed=4)
    load_sites([site])
    lines = (site / "labels.csv").read_text().splitlines()
    (site / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")  # one slide removed
    with pytest.raises(SplitError, match=r"splits.csv no longer fits: 1 slide\(s\) in it but not in"):
        load_sites([site])


# ---- refusals before training ------------------------------------------------------------------------------
def test_too_few_slides_per_class_is_refused_naming_site_file_and_fix(tmp_path: Path) -> None:
    site = unsplit_site(tmp_path, "E", 5, seed=5)  # neg 3, pos 2
    with pytest.raises(SplitError) as err:
        load_sites([site])
    message = str(err.value)
    assert f"site E ({site / 'labels.csv'}, no split column)" in message
    assert "class 'pos' has 2 patient(s)" in message and "carve.test-fraction = 0" in message
    assert not (site / SPLITS_FILE).exists()
    assert load_sites([site], carving=SplitCarving(test_fraction=0)).split("val").size  # train + val: enough


def test_a_test_split_without_a_class_is_refused() -> None:
    ids = [f"s{i}" for i in range(13)]
    labels = ["neg"] * 10 + ["pos"] * 3
    with pytest.raises(SplitError, match=r"the carved test split has no slide of class\(es\) 'pos'"):
        carve_splits(ids, labels, ids, ("neg", "pos"), 0.1, 0.2, 0, "site X")


def test_distill_refuses_before_training_and_leaves_no_run_folder(tmp_path: Path) -> None:
    site = unsplit_site(tmp_path, "F", 5, seed=6)
    out = tmp_path / "run"
    with pytest.raises(SplitError, match="too few slides per class"):
        run_distill(DistillConfig(sites=[site], out_dir=out))
    assert not out.exists()


def test_evaluate_refuses_a_held_out_site_without_test_slides(sites: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "study"
    cfg = tiny_study(sites, out, regimes=["federated"], held_out_split="test", carve={"test_fraction": 0})
    copies = []
    for site in sites:  # carve into copies: the module's sites keep their default carving
        copy = tmp_path / site.name
        copy.mkdir()
        for item in ("labels.csv", "features"):
            (copy / item).symlink_to(site / item)
        copies.append(copy)
    with pytest.raises(ConfigError, match=r"site site_a: no test slides .*set held-out-split = \"all\""):
        run_study(cfg.model_copy(update={"sites": copies}))
    assert not out.exists()


def test_evaluate_refuses_a_site_without_labelled_slides(sites: list[Path], tmp_path: Path) -> None:
    empty = tmp_path / "site_empty"
    empty.mkdir()
    (empty / "features").symlink_to(sites[0] / "features")
    (empty / "labels.csv").write_text("slide_id,label\n")
    out = tmp_path / "study"
    with pytest.raises(LabelsError, match=f"labels file {empty / 'labels.csv'} has no slides"):
        run_study(tiny_study([*sites[:2], empty], out, regimes=["federated"]))
    assert not out.exists()


def test_missing_predictions_name_their_first_cause() -> None:
    fed: dict[str, Any] = {
        "sites": [
            {"node": 1, "name": "a", "role": "train", "n-test": 2},
            {"node": 2, "name": "b", "role": "eval-only"},
        ],
        "refused": [{"node": 3, "reason": "handshake failed at the site: SplitError: too few slides per class"}],
        "missing": [
            {"phase": "teacher", "round": 2, "nodes": [2], "reasons": {"2": "RuntimeError: out of memory"}},
            {"phase": "final", "round": 0, "nodes": [2], "reasons": {"2": "timeout"}},
        ],
    }
    assert "refused at the handshake: handshake failed at the site: SplitError" in missing_predictions_cause(fed, "c")
    assert missing_predictions_cause(fed, "b") == (
        "site b gave no usable reply in phase teacher round 2: RuntimeError: out of memory"
    )
    assert "did not finish the federation's final evaluation" in missing_predictions_cause(fed, "a")


# ---- the commands on the cohort --------------------------------------------------------------------
def test_distill_carves_and_scores_a_test_split(sites: list[Path], tmp_path: Path) -> None:
    cfg = DistillConfig(
        sites=sites,
        out_dir=tmp_path / "run",
        teacher=TINY,
        student=TINY,
        threads=1,
        adapter={"hidden_dim": 16, "epochs": 1},
        clusters={"num_clusters": 2},
        training={"epochs": 2, "lr": 1e-2},
    )
    report = run_distill(cfg, progress=False)
    assert all((site / SPLITS_FILE).is_file() for site in sites)
    rows = {r["model"]: r for r in report.metrics["rows"]}
    assert rows and all(isinstance(r.get("auc"), float) for r in rows.values()), rows  # test metrics, not n/a


def test_federation_carves_at_each_site_and_sends_only_counts(sites: list[Path], tmp_path: Path) -> None:
    cfg = FederationConfig(
        run_id="carved",
        runs_dir=tmp_path / "runs",
        rounds=ONE_ROUND,
        teacher=TINY,
        student=TINY,
        threads=1,
        adapter={"hidden_dim": 16},
        clusters={"num_clusters": 2},
        training={"lr": 1e-2},
    )
    run_config = cfg.to_run_config()
    grid = LocalGrid(client_app, [{"site-dir": str(s)} for s in sites], run_config)
    result = run(grid, FederationConfig.from_run_config(run_config))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    for site, info in zip(sites, sorted(metrics["sites"], key=lambda s: s["name"])):
        carved = splits_of(site)
        for split in ("train", "val", "test"):  # the server knows the counts the site carved, per class
            assert info[f"n-{split}"] == sum(v == split for v in carved.values())
        assert info["n-test-class-0"] >= 1 and info["n-test-class-1"] >= 1
        ledger = (site / "runs" / "carved" / "egress.jsonl").read_text()
        assert not any(sid in ledger for sid in carved)  # no slide id (so no split membership) ever left the site
        handshake = json.loads(next(line for line in ledger.splitlines() if '"handshake"' in line))
        assert "n-test-class-1" in json.dumps(handshake)
        with (site / "runs" / "carved" / "predictions.csv").open(newline="") as handle:
            scored = {row["slide_id"] for row in csv.DictReader(handle)}
        assert scored == {sid for sid, split in carved.items() if split == "test"}
    assert all(isinstance(r.get("auc"), float) for r in metrics["rows"])


@pytest.mark.slow
def test_evaluate_federated_on_sites_without_split_column(sites: list[Path], tmp_path: Path) -> None:
    """The issue's case: `fedslide evaluate --sites A B C --out STUDY --regimes federated`."""
    cfg = tiny_study(sites, tmp_path / "study", regimes=["federated"], report=False)
    cfg.heatmaps.enabled = False
    result = run_study(cfg)
    cohort = {row["name"]: row for row in result.metrics["sites"]}
    for site in sites:
        carved = splits_of(site)
        assert cohort[site.name]["splits"] == {
            sp: sum(v == sp for v in carved.values()) for sp in ("train", "val", "test")
        }
    student = result.metrics["models"]["federated.student_low"]
    assert student["in_distribution"]["overall"]["auc"]["estimate"] is not None
    assert student["out_of_site"]["overall"]["auc"]["estimate"] is not None


def test_a_failed_federation_reports_the_first_error_of_its_log() -> None:
    from fedslide.deploy.federate import first_error

    log_text = (
        "INFO handshake: asking 3 sites\n"
        "WARNING handshake: refused site site_b (node 2): handshake failed at the site: SplitError: site site_b"
        " (labels.csv, no split column): too few slides per class to carve splits\n"
        'Traceback (most recent call last):\n  File "protocol.py", line 1\n'
        "FederationError: handshake: 1 site(s) admitted, min-nodes = 2\n"
    )
    assert "SplitError: site site_b" in first_error(log_text) and "min-nodes" not in first_error(log_text)
