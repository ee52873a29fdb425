"""Multi-class subtyping (C = 3) through every phase: synth, labels, metrics, distillation, egress, federation, report."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from fedslide.client.synth.cohort import generate_cohort, plan_site
from fedslide.client.synth.fields import SlideFields
from fedslide.client.synth.subtypes import lesion_appearance, plan_labels
from fedslide.client.synth.tissue_render import SlideModel, render_region
from fedslide.common.config.base import ConfigError
from fedslide.common.config.distill import ClusterConfig, DistillConfig
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.synth import SynthConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.data import load_sites
from fedslide.common.distillation.losses import distillation_loss
from fedslide.common.egress import ArraySpec, EgressViolation, check_reply
from fedslide.common.evaluation.multiclass_plots import PER_CLASS_HEADER, multiclass_figures, per_class_rows
from fedslide.common.evaluation.predictions import PredictionTable, PredRow
from fedslide.common.metrics import classification_metrics, classwise_ece, confusion, per_class_metrics, roc_auc
from fedslide.common.training.errors import LabelsError
from fedslide.common.training.labels import read_labels
from tests.multiclass_sites import CLASSES, make_multiclass_site

SORTED = tuple(sorted(CLASSES))  # benign, carcinoma, normal: the derived label map


# --------------------------------------------------------------------------- metrics vs hand computations
def _toy() -> tuple[np.ndarray, np.ndarray]:
    y = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    p = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.3, 0.6, 0.1],  # 0 predicted as 1
            [0.1, 0.8, 0.1],
            [0.2, 0.3, 0.5],  # 1 predicted as 2
            [0.1, 0.1, 0.8],
            [0.2, 0.2, 0.6],
            [0.5, 0.1, 0.4],  # 2 predicted as 0
            [0.9, 0.05, 0.05],
        ]
    )
    return y, p


def test_per_class_metrics_match_hand_computations() -> None:
    y, p = _toy()
    report = per_class_metrics(y, p, ["a", "b", "c"], n_bins=2)
    # confusion matrix, counted by hand (rows = true, columns = predicted)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert confusion(y, p).tolist() == report["confusion_matrix"]
    # per-class F1 = 2 tp / (2 tp + fp + fn)
    want_f1 = {"a": 2 * 2 / (4 + 1 + 1), "b": 2 * 1 / (2 + 1 + 1), "c": 2 * 2 / (4 + 1 + 1)}
    assert report["f1"] == pytest.approx(want_f1)
    assert list(report["f1"].values()) == pytest.approx(f1_score(y, p.argmax(1), average=None))
    assert report["support"] == {"a": 3, "b": 2, "c": 3}
    # one-vs-rest AUC per class; macro AUC is their mean
    for c, name in enumerate("abc"):
        assert report["auc_ovr"][name] == pytest.approx(roc_auc_score(y == c, p[:, c]))
    assert roc_auc(y, p) == pytest.approx(np.mean(list(report["auc_ovr"].values())))
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    # classwise ECE with 2 bins ((0, .5], (.5, 1]): class a's scores .7 .3 .1 .2 .1 .2 .5 .9
    low = np.array([0.3, 0.1, 0.2, 0.1, 0.2, 0.5])  # slides 1..6: labels 0 1 1 2 2 2 -> 1 hit of class a
    high = np.array([0.7, 0.9])  # slides 0, 7: both class a
    want_a = 6 / 8 * abs(1 / 6 - low.mean()) + 2 / 8 * abs(1.0 - high.mean())
    assert report["ece"]["a"] == pytest.approx(want_a)
    ece = classwise_ece(y, p, n_bins=2)
    assert ece[0] == pytest.approx(want_a) and report["classwise_ece"] == pytest.approx(ece.mean())
    # the summary metrics agree with sklearn's macro definitions
    summary = classification_metrics(y, p)
    assert summary["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))


def test_per_class_auc_is_nan_for_an_absent_class_and_names_must_match() -> None:
    y, p = _toy()
    report = per_class_metrics(y[y != 1], p[y != 1], ["a", "b", "c"])
    assert math.isnan(report["auc_ovr"]["b"]) and report["support"]["b"] == 0
    with pytest.raises(ValueError, match="2 class names"):
        per_class_metrics(y, p, ["a", "b"])


# --------------------------------------------------------------------------- labels and the label map
def test_label_map_from_config_orders_classes_and_names_unknown_labels(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\ns1,normal\ns2,carcinoma\ns3,benign\ns4,adenosis\n")
    assert read_labels(path).classes == ("adenosis", "benign", "carcinoma", "normal")  # derived: sorted
    with pytest.raises(LabelsError) as err:
        read_labels(path, ["normal", "benign", "carcinoma"])
    message = str(err.value)
    assert str(path) in message and "line 5" in message and "'adenosis'" in message
    assert "allowed: normal, benign, carcinoma" in message
    path.write_text("slide_id,label\ns1,normal\ns2,carcinoma\n")
    table = read_labels(path, ["normal", "benign", "carcinoma"])  # a class may be absent at a site
    assert table.classes == ("normal", "benign", "carcinoma") and table.label_map["carcinoma"] == 2
    with pytest.raises(Exception, match="distinct"):
        DistillConfig(classes=["a", "a"])
    assert FederationConfig.from_run_config(FederationConfig(classes=CLASSES).to_run_config()).classes == list(CLASSES)


# --------------------------------------------------------------------------- synth: the 3-class task
def test_synth_subtyping_plans_three_balanced_classes_and_keeps_binary_plans() -> None:
    k = 7
    assert plan_labels("binary", k) == ["tumor"] * (k // 2) + ["normal"] * (k - k // 2)  # the historical order
    assert sorted(plan_labels("subtyping", k)) == ["benign"] * 2 + ["carcinoma"] * 2 + ["normal"] * 3
    base = dict(out_dir=Path("unused"), sites=2, slides_per_site=9, seed=3, progress=False)
    binary, subtyping = SynthConfig(**base), SynthConfig(**base, task="subtyping")  # type: ignore[arg-type]
    for i in (1, 2):
        plan = plan_site(subtyping, i)
        assert sorted(s.label for s in plan.slides) == ["benign"] * 3 + ["carcinoma"] * 3 + ["normal"] * 3
        assert all((s.tumor_fraction is None) == (s.label == "normal") for s in plan.slides)
        for label in ("benign", "carcinoma", "normal"):  # every class in the test split
            assert any(s.split == "test" and s.label == label for s in plan.slides), (i, label)
        assert {s.label for s in plan_site(binary, i).slides} == {"normal", "tumor"}
    with pytest.raises(Exception, match="slides-per-site >= 3"):
        SynthConfig(**{**base, "slides_per_site": 2}, task="subtyping")  # type: ignore[arg-type]


def _uniform(label: str, seed: int) -> SlideModel:
    """Tissue everywhere, all lesion of `label` (or none for normal)."""
    n = 80
    full = np.full((n, n), 1000.0, dtype=np.float32)
    fields = SlideFields(
        width_um=600.0,
        height_um=600.0,
        spacing_um=8.0,
        tissue_sdf=full,
        gain=np.ones((n, n), np.float32),
        orientation=np.full((n, n), 0.5, np.float32),
        tumor_sdf=None if label == "normal" else full,
    )
    return dataclasses.replace(
        SlideModel(fields=fields, stain=_stain(), seed=seed), appearance=lesion_appearance(label)
    )


def _stain():  # noqa: ANN202
    from fedslide.client.synth.stains import Stain

    return Stain()


def _texture(rgb: np.ndarray, block: int = 4) -> float:
    g = rgb.astype(np.float64).mean(-1)
    h, w = (g.shape[0] // block) * block, (g.shape[1] // block) * block
    return float(g[:h, :w].reshape(h // block, block, w // block, block).std(axis=(1, 3)).mean())


def test_each_class_has_its_own_20x_cue_and_a_weaker_5x_cue() -> None:
    labels = ("normal", "benign", "carcinoma")
    models = [_uniform(label, 101) for label in labels]
    high = [_texture(render_region(m, 0.5, 0, 0, 320, 320)) for m in models]  # 20x texture
    low = [render_region(m, 2.0, 0, 0, 96, 96).reshape(-1, 3).mean(0) for m in models]  # 5x mean colour
    # 20x: three clearly different textures (normal < benign < carcinoma)
    assert high[1] > 1.2 * high[0] and high[2] > 1.3 * high[1], high
    # 5x: mean colours within a few grey levels of normal tissue (benign slightly paler, carcinoma alike)
    assert np.abs(low[1] - low[0]).max() < 5.0 and np.abs(low[2] - low[0]).max() < 3.0, low
    assert np.abs(low[1] - low[0]).max() > 1.0  # but benign's weak 5x cue is there


def test_synth_writes_a_three_class_cohort_with_lesion_masks(tmp_path: Path) -> None:
    cfg = SynthConfig(
        out_dir=tmp_path / "c", sites=1, slides_per_site=3, seed=2, slide_size_um=(420.0, 480.0), progress=False,
        task="subtyping",
    )  # fmt: skip
    (site,) = generate_cohort(cfg)
    with (site / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["label"] for r in rows) == ["benign", "carcinoma", "normal"]
    meta = json.loads((site / "cohort.json").read_text())
    assert meta["labels"] == {"normal": 1, "benign": 1, "carcinoma": 1} and meta["settings"]["task"] == "subtyping"
    masks = json.loads((site / "masks" / "masks.json").read_text())["slides"]
    for r in rows:
        assert (masks[r["slide_id"]]["tumor_pixels"] > 0) == (r["label"] != "normal"), r
    with pytest.raises(ConfigError):  # the same folder with other settings is refused
        generate_cohort(cfg.model_copy(update={"task": "binary"}))


# --------------------------------------------------------------------------- losses, egress shapes
def test_kd_loss_over_three_classes_matches_hand_computation() -> None:
    torch.manual_seed(0)
    s, t, e = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2, 3)
    labels = torch.tensor([0, 1, 2, 1])
    temp = 2.0

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # KL(softmax(b/T) || softmax(a/T)) T^2, batch mean
        pb = torch.softmax(b / temp, 1)
        return (pb * (pb.log() - torch.log_softmax(a / temp, 1))).sum(1).mean() * temp**2

    want = torch.nn.functional.cross_entropy(s, labels) + kl(s, t) + 0.5 * (kl(s, e[:, 0]) + kl(s, e[:, 1]))
    got = distillation_loss(s, labels, t, e, temperature=temp, lambda_base=1.0, lambda_expert=1.0)
    assert float(got.total) == pytest.approx(float(want), rel=1e-5)


def test_egress_policy_checks_the_class_dimension_of_logits() -> None:
    from flwr.app import Array, ArrayRecord, RecordDict

    from fedslide.common.egress import arrays_reply
    from fedslide.common.federation import phases as ph

    record = ph.LOGITS.reply_arrays
    assert record is not None
    n, experts = 5, 2  # logits mode: teacher [n, C] and expert [E, n, C] logits on the proxy cohort, C = 3
    allowed = arrays_reply(
        ph.LOGITS.name,
        {
            ph.TEACHER_LOGITS: ArraySpec((n, 3), "float32"),
            ph.EXPERT_LOGITS: ArraySpec((experts, n, 3), "float32"),
        },
    )

    def reply(classes: int) -> RecordDict:
        arrays = {
            ph.TEACHER_LOGITS: Array(np.zeros((n, classes), np.float32)),
            ph.EXPERT_LOGITS: Array(np.zeros((experts, n, classes), np.float32)),
        }
        return RecordDict({record: ArrayRecord(arrays)})  # type: ignore[arg-type]

    check_reply(reply(3), allowed)
    with pytest.raises(EgressViolation, match="shape"):
        check_reply(reply(2), allowed)  # binary-shaped logits where the federation has three classes


# --------------------------------------------------------------------------- centralized distillation
SMALL = [
    "adapter.hidden-dim=32",
    "adapter.epochs=3",
    "adapter.batch-size=64",
    "teacher.hidden-dim=16",
    "teacher.attention-dim=8",
    "student.hidden-dim=16",
    "student.attention-dim=8",
    "training.epochs=3",
    "training.lr=0.005",
    "training.batch-size=2",
    "training.early-stopping-patience=0",
    "clusters.num-clusters=2",
    "clusters.features=logits",
    "clusters.min-size=1",
]


@pytest.mark.slow
def test_distill_three_classes_through_every_stage(tmp_path: Path) -> None:
    from fedslide.common.distillation.cli import add_parser

    sites = [make_multiclass_site(tmp_path, f"site{i}", {"train": 9, "val": 3, "test": 3}, seed=20 + i) for i in (1, 2)]
    out = tmp_path / "run"
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["distill", "--sites", *map(str, sites), "--out", str(out), "--no-progress"]
    for item in SMALL:
        argv += ["--set", item]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == list(SORTED)
    for name, model in metrics["models"].items():
        per_class = model["per_class_test"]
        assert per_class["classes"] == list(SORTED), name
        matrix = np.array(per_class["confusion_matrix"])
        assert matrix.shape == (3, 3) and matrix.sum() == model["test"]["n"] == 6, name
        assert set(per_class["f1"]) == set(SORTED) and 0.0 <= per_class["classwise_ece"] <= 1.0
    assert sum(metrics["clusters"]["sizes"]) == 18  # clustered on 3-dim teacher logits
    data = load_sites(sites)
    s = data.slides[int(data.split("test")[0])]
    bundle = StudentBundle.load(out / "student")
    assert bundle.meta.class_names == list(SORTED)
    probs, att, low, _ = bundle.predict_low(
        torch.from_numpy(s.low.features), torch.from_numpy(s.low.tokens), torch.from_numpy(s.low.coords)
    )
    assert probs.shape == (3,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    assert bundle.predict_high(torch.from_numpy(s.high.features))[0].shape == (3,)


# --------------------------------------------------------------------------- in-process federation
@pytest.mark.slow
def test_federation_of_three_class_sites(tmp_path: Path) -> None:
    from tests.test_federation import federate, tiny_config

    sites = [make_multiclass_site(tmp_path, f"site{i}", {"train": 9, "val": 3, "test": 6}, seed=i) for i in (1, 2, 3)]
    order = ["normal", "benign", "carcinoma"]  # a configured label map fixes the class order
    cfg = tiny_config(tmp_path, "mc", classes=order)
    cfg = cfg.model_copy(update={"clusters": ClusterConfig(num_clusters=2, features="logits")})  # D&D on logits
    result, _ = federate(sites, cfg)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["classes"] == order
    for model in ("teacher_high", "student_low", "baseline_low"):
        overall = metrics["models"][model]["overall"]
        assert overall["n"] == 18 and 0.0 <= overall["auc"] <= 1.0
    assert metrics["models"]["teacher_high"]["overall"]["auc"] >= 0.8  # macro OvR on an easy toy task
    for site in sites:
        assert metrics["auc_resolution"][site.name]["slides_per_class"] == [2, 2, 2]
        shapes: dict[str, set[tuple[int, ...]]] = {}
        for line in (site / "runs" / "mc" / "egress.jsonl").read_text().splitlines():
            entry = json.loads(line)
            for a in entry.get("arrays", []):
                shapes.setdefault(f"{entry['phase']}:{a['name']}", set()).add(tuple(a["shape"]))
        assert shapes["cluster-stats:sums"] == {(2, 3)}  # per-cluster sums of 3-dim logits
        with (site / "runs" / "mc" / "predictions.csv").open() as fh:
            header = next(csv.reader(fh))
        assert sum(h.startswith("student_low_p") for h in header) == 3
    bundle = StudentBundle.load(sites[0] / "runs" / "mc" / "student_bundle")
    assert bundle.meta.class_names == order


def test_federation_refuses_labels_outside_the_configured_classes(tmp_path: Path) -> None:
    from fedslide.server.strategies import FederationError
    from tests.test_federation import federate, tiny_config

    sites = [make_multiclass_site(tmp_path, f"site{i}", {"train": 3, "val": 3, "test": 3}, seed=i) for i in (1, 2)]
    cfg = tiny_config(tmp_path, "refuse", classes=["normal", "carcinoma"])
    with pytest.raises(FederationError, match="benign"):
        federate(sites, cfg)


# --------------------------------------------------------------------------- report figures
def test_report_figures_and_per_class_rows() -> None:
    rng = np.random.default_rng(0)
    table = PredictionTable(classes=SORTED)
    for setting in ("in_distribution", "out_of_site"):
        for model in ("federated.student_low", "federated.teacher_high"):
            for i in range(30):
                y = i % 3
                logits = rng.normal(size=3) + 2.0 * np.eye(3)[y]
                probs = np.exp(logits) / np.exp(logits).sum()
                table.rows.append(PredRow(setting, model, "f", "site1", f"s{i}", f"site1/s{i}", "test", y, probs))
    figures = multiclass_figures(table, ["federated.student_low", "federated.teacher_high"])
    assert [f.name for f in figures] == [
        "confusion_in_distribution.png",
        "roc_per_class_in_distribution.png",
        "confusion_out_of_site.png",
        "roc_per_class_out_of_site.png",
    ]
    assert all(f.png.startswith(b"\x89PNG") and len(f.png) > 5000 for f in figures)
    rows = per_class_rows(table, "out_of_site", ["federated.student_low"])
    assert len(rows) == 3 and len(rows[0]) == len(PER_CLASS_HEADER) and [r[1] for r in rows] == list(SORTED)
    assert sum(r[2] for r in rows) == 30  # type: ignore[misc]
    binary = PredictionTable(classes=("neg", "pos"), rows=[])
    assert multiclass_figures(binary, ["federated.student_low"]) == []
