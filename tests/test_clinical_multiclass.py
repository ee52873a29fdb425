"""End to end: an in-process federation of three 3-class sites (normal / benign / carcinoma) with the clinical (BD)
phase on and per-site clinical missingness 0 / 50 / 100 %, every phase to the end: 3-output student and BD model in
every bundle, branch routing at prediction, per-class metrics in metrics.json, and an egress ledger that holds only
declared arrays of C = 3 shapes and never a class name."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedslide.client.synth.clinical import COLUMNS, clinical_rows
from fedslide.common.config.distill import ClusterConfig
from fedslide.common.config.federation import FederationConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.clinical_model import ClinicalModel, build_bd
from fedslide.common.distillation.data import load_sites
from fedslide.common.federation import phases as ph
from fedslide.common.metrics import classification_metrics
from fedslide.deploy.study.clinical_missingness import clinical_missingness
from fedslide.server.checkpoint import Checkpoint
from tests.feature_sites import D
from tests.multiclass_sites import CLASSES, make_multiclass_site
from tests.test_federation import federate, tiny_config

RUN = "bd3"
ORDER = list(CLASSES)  # normal, benign, carcinoma: the configured label map = the clinical severity order
MISSING = (0.0, 0.5, 1.0)  # of each split's slides, per site
BD = {"enabled": True, "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0, "batch_size": 4}
ROUNDS = {"adapter": 1, "teacher": 1, "experts": 1, "baseline": 1, "student": 1, "clinical": 2, "cluster_iterations": 2}


def _write_clinical(site: Path, missing: float, seed: int) -> None:
    """clinical.csv keyed by slide_id: `missing` of each split's rows all NA, the signal growing with severity."""
    with (site / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(seed)
    out = []
    for split in ("train", "val", "test"):
        part = [r for r in rows if r["split"] == split]
        cells = clinical_rows([ORDER.index(r["label"]) for r in part], missing, rng, num_classes=len(ORDER))
        out += [[r["slide_id"], *c] for r, c in zip(part, cells)]
    with (site / "clinical.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", *COLUMNS])
        writer.writerows(out)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("bd3-sites")
    out = []
    for i, missing in enumerate(MISSING, start=1):
        site = make_multiclass_site(root, f"site{i}", {"train": 6, "val": 4, "test": 4}, seed=i)
        _write_clinical(site, missing, seed=i)
        out.append(site)
    return out


@pytest.fixture(scope="module")
def run(sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    cfg = tiny_config(
        tmp_path_factory.mktemp("bd3-run"),
        RUN,
        classes=ORDER,
        suppress_below=3,
        clinical=BD,
        rounds=ROUNDS,
    )
    cfg = cfg.model_copy(update={"clusters": ClusterConfig(num_clusters=2, features="logits", min_size=1)})
    return federate(sites, cfg)


def _ledger(site: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (site / "runs" / RUN / "egress.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_three_class_federation_with_clinical_data_runs_every_phase(run: tuple[Any, Any], sites: list[Path]) -> None:
    result, _ = run
    ckpt = Checkpoint(result.run_dir)
    done = ckpt.phase_done(ph.CLINICAL.name)
    assert done is not None and done["rounds"] == ROUNDS["clinical"]
    final = ckpt.load_arrays(f"{ph.CLINICAL.name}.final")
    assert final is not None
    bd_shapes = {
        k: tuple(v.shape) for k, v in build_bd(D, FederationConfig(clinical=BD).clinical, 3).state_dict().items()
    }
    assert {k: tuple(v.shape) for k, v in final.items()} == bd_shapes  # the 3-class BD model's arrays, nothing else
    assert tuple(final["multi.head.weight"].shape)[0] == tuple(final["single.head.weight"].shape)[0] == 3
    # every site's bundle: a 3-class student and the same 3-output BD model
    data = load_sites([sites[0]])
    s = data.slides[int(data.split("test")[0])]
    low = s.low
    tokens = None if low.tokens is None else torch.from_numpy(low.tokens)
    for site in sites:
        bundle = StudentBundle.load(site / "runs" / RUN / "student_bundle")
        assert bundle.meta.class_names == ORDER
        probs = bundle.predict_low(torch.from_numpy(low.features), tokens, torch.from_numpy(low.coords))[0]
        assert probs.shape == (3,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
        assert bundle.clinical is not None and bundle.clinical.num_classes == 3
        for key, value in final.items():
            np.testing.assert_array_equal(bundle.clinical.model.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    # prediction: a complete row reads the multi-modal branch, a missing one the single-modal branch; both 3-class
    bundle = StudentBundle.load(sites[0] / "runs" / RUN / "student_bundle")
    bd = bundle.clinical
    assert isinstance(bd, ClinicalModel)
    instances = bundle.student_instances(torch.from_numpy(low.features), tokens)[0]
    row = bd.read_table(sites[0] / "clinical.csv").lookup([s.slide_id])[0]
    assert not np.isnan(row).any()  # site1 misses no row
    p_multi, branch_multi = bd.predict(instances, row)
    p_single, branch_single = bd.predict(instances, None)
    assert (branch_multi, branch_single) == ("multi", "single")
    for p in (p_multi, p_single):
        assert p.shape == (3,) and float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(p_multi, p_single)


@pytest.mark.slow
def test_metrics_json_has_per_class_metrics_for_every_model(run: tuple[Any, Any]) -> None:
    result, _ = run
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["classes"] == ORDER
    for model in ("teacher_high", "student_low", "baseline_low"):
        table = metrics["models"][model]["per_class"]["overall"]
        assert table["classes"] == ORDER
        matrix = np.array(table["confusion_matrix"])
        assert matrix.shape == (3, 3) and matrix.sum() == 12, model  # 3 sites × 4 test slides
        assert [table["per_class"][c]["support"] for c in ORDER] == [6, 3, 3], (
            model
        )  # per site: 2 normal, 1 benign, 1 carcinoma
    for model in ("bd_clinical", "bd_no_clinical"):  # the BD model's rows carry the same per-class tables
        table = metrics["models"][model]["per_class"]["overall"]
        assert table["classes"] == ORDER and table["sites"] == ["site1", "site2", "site3"], model
        assert np.array(table["confusion_matrix"]).sum(axis=1).tolist() == [6, 3, 3], model
        assert all(0.0 <= table["per_class"][c]["ece"] <= 1.0 for c in ORDER), model
    site3 = metrics["models"]["bd_clinical"]["per_class"]["overall"]["per_site"]["site3"]
    assert site3 == metrics["models"]["bd_no_clinical"]["per_class"]["overall"]["per_site"]["site3"]  # no rows
    report = (result.run_dir / "report.md").read_text()
    assert "**bd_clinical**, overall slides" in report
    bd = metrics["models"]["bd_clinical"]
    assert bd["with_clinical"] == {"site1": 4, "site2": 2, "site3": 0}  # test slides with a row: 0 / 50 / 100 % missing
    rows = {row["model"]: row for row in metrics["rows"]}
    assert rows["bd_clinical"]["n"] == rows["bd_no_clinical"]["n"] == 12


@pytest.mark.slow
def test_the_ledger_holds_only_declared_three_class_arrays_and_no_class_names(
    run: tuple[Any, Any], sites: list[Path]
) -> None:
    bd_names = set(build_bd(D, FederationConfig(clinical=BD).clinical, 3).state_dict())
    for site in sites:
        ledger = _ledger(site)
        for entry in ledger:
            declared = ph.by_name(entry["phase"])
            for array in entry["arrays"]:
                assert declared.allows_array(array["name"]), (entry["phase"], array["name"])
            for metric in entry["metrics"]:
                assert declared.allows_metric(metric.split(".", 1)[1]), (entry["phase"], metric)
        shapes: dict[str, set[tuple[int, ...]]] = {}
        for entry in ledger:
            for a in entry["arrays"]:
                shapes.setdefault(f"{entry['phase']}:{a['name']}", set()).add(tuple(a["shape"]))
        assert shapes["cluster-stats:sums"] == {(2, 3)}  # per-cluster sums of 3-dim logits
        clinical = {k.split(":", 1)[1] for k in shapes if k.startswith(f"{ph.CLINICAL.name}:")}
        assert clinical == bd_names
        sent = {m.split(".", 1)[1] for e in ledger if e["phase"] == ph.EVALUATION.name for m in e["metrics"]}
        assert {"bd_clinical.f1-c2", "bd_no_clinical.auc-c0", "bd_clinical.confusion-2-1"} <= sent  # by index
        words = {w for entry in ledger for text in _strings(entry) for w in re.split(r"[^a-z0-9_]+", text.lower())}
        assert not words & set(ORDER), words & set(ORDER)  # metric and array names carry class indices only


def _strings(value: Any) -> list[str]:
    """Every string (keys and values) in a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@pytest.mark.slow
def test_the_loso_clinical_column_scores_three_classes_in_the_bundles_order(
    run: tuple[Any, Any], sites: list[Path]
) -> None:
    """The study loads slides with its own class order (sorted names here: benign, carcinoma, normal); the column maps
    them by name to the BD model's order (normal, benign, carcinoma) before the macro one-vs-rest AUC."""
    bundle_dir = sites[1] / "runs" / RUN / "student_bundle"
    data = load_sites([sites[1]])  # site2: half its rows missing
    assert list(data.classes) == sorted(ORDER) != ORDER
    slides = [s for s in data.slides if s.split in ("val", "test")]
    column = clinical_missingness(bundle_dir, sites[1], slides, classes=data.classes)
    assert column is not None and column["n"] == 8 and column["with_clinical"] == 4
    bundle = StudentBundle.load(bundle_dir)
    assert bundle.clinical is not None
    labels = np.array([ORDER.index(data.classes[s.label]) for s in slides])
    table = bundle.clinical.read_table(sites[1] / "clinical.csv")
    for level, rows in (("0", table.lookup([s.slide_id for s in slides])), ("100", [None] * len(slides))):
        probs = []
        for s, row in zip(slides, rows):
            tokens = None if s.low.tokens is None or not bundle.uses_tokens else torch.from_numpy(s.low.tokens)
            instances = bundle.student_instances(torch.from_numpy(s.low.features), tokens)[0]
            probs.append(bundle.clinical.predict(instances, row)[0].double().numpy())
        want = classification_metrics(labels, np.stack(probs))["auc"]
        assert column["auc"][level] == pytest.approx(want), level
    ordered = load_sites([sites[1]], classes=ORDER)  # slides already in the bundle's order: the same column
    same = [s for s in ordered.slides if s.split in ("val", "test")]
    assert clinical_missingness(bundle_dir, sites[1], same) == column
    with pytest.raises(ValueError, match="atypia"):
        clinical_missingness(bundle_dir, sites[1], slides, classes=["atypia", "carcinoma", "normal"])
