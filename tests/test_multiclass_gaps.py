"""Multi-class gaps (issue 34, part 3): per-class metrics leave the sites by class index and come back by name,
one class order for server and sites, distill's per-slide test predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from fedslide.common.distillation.split_predictions import read_test_predictions, write_test_predictions
from fedslide.common.egress import Allowed, EgressViolation, check_reply
from fedslide.common.federation import per_class
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.metrics import classwise_ece
from fedslide.common.training.labels import class_order, read_labels
from tests.feature_sites import make_site
from tests.multiclass_sites import make_multiclass_site


def _probs(rng: np.random.Generator, y: np.ndarray, k: int) -> np.ndarray:
    logits = rng.normal(size=(y.size, k)) + 1.5 * np.eye(k)[y]
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- per-class metric names and pooling
def test_site_per_class_metrics_are_named_by_index_and_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1, 1])
    probs = _probs(rng, y, 3)
    out = per_class.site_metrics("student_low", y, probs)
    pred = probs.argmax(axis=1)
    f1 = f1_score(y, pred, labels=[0, 1, 2], average=None, zero_division=0.0)
    ece = classwise_ece(y, probs)
    for k in range(3):
        assert out[f"student_low.f1-c{k}"] == pytest.approx(f1[k])
        assert out[f"student_low.auc-c{k}"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
        assert out[f"student_low.ece-c{k}"] == pytest.approx(ece[k])
    matrix = confusion_matrix(y, pred, labels=[0, 1, 2])
    assert all(out[f"student_low.confusion-{i}-{j}"] == matrix[i, j] for i in range(3) for j in range(3))
    assert len(out) == 3 * 3 + 9
    # binary: the macro metrics already say it; too many classes: over the byte cap
    assert per_class.site_metrics("student_low", y % 2, _probs(rng, y % 2, 2)) == {}
    big = np.arange(per_class.MAX_PER_CLASS + 1)
    assert per_class.site_metrics("student_low", big, _probs(rng, big, big.size)) == {}


def test_pooled_per_class_table_sums_confusion_counts_and_weights_auc_by_class_slides() -> None:
    rng = np.random.default_rng(1)
    classes = ("normal", "benign lesion, low grade", "carcinoma")  # any string
    ys = [np.array([0, 0, 1, 1, 2, 2, 2]), np.array([0, 1, 1, 1, 2, 0, 1, 2])]
    ps = [_probs(rng, y, 3) for y in ys]
    per_site = {f"site{i}": per_class.site_metrics("teacher_high", y, p) for i, (y, p) in enumerate(zip(ys, ps))}
    per_site["site1"].pop("teacher_high.auc-c2")  # a site without that class's AUC is left out of its mean
    table = per_class.pooled(per_site, "teacher_high", classes)
    assert table is not None
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    pooled_f1 = f1_score(y_all, p_all.argmax(axis=1), labels=[0, 1, 2], average=None)
    assert table["confusion_matrix"] == confusion_matrix(y_all, p_all.argmax(axis=1), labels=[0, 1, 2]).tolist()
    for k, name in enumerate(classes):
        row = table["per_class"][name]
        assert row["support"] == int((y_all == k).sum())
        assert row["f1"] == pytest.approx(pooled_f1[k])
    n0 = [int((y == 0).sum()) for y in ys]
    aucs = [roc_auc_score(y == 0, p[:, 0]) for y, p in zip(ys, ps)]
    assert table["per_class"]["normal"]["auc"] == pytest.approx(np.average(aucs, weights=n0))
    assert table["per_class"]["carcinoma"]["auc"] == pytest.approx(roc_auc_score(ys[0] == 2, ps[0][:, 2]))
    assert table["per_site"]["site1"]["benign lesion, low grade"]["support"] == 4
    lines = per_class.report_lines({"teacher_high": {"per_class": {"overall": table}}})
    assert any(line.startswith("| benign lesion, low grade | 6 |") for line in lines)
    assert per_class.pooled({"site0": {"teacher_high.auc": 0.5}}, "teacher_high", classes) is None


def test_egress_lets_per_class_metrics_leave_by_index_only() -> None:
    rng = np.random.default_rng(2)
    y = np.arange(24) % 6
    metrics = {ph.N_TEST: 24.0, "student_low.auc": 0.9}
    for model in ph.EVALUATED_MODELS[:3]:
        metrics.update(per_class.site_metrics(model, y, _probs(rng, y, 6)))
    check_reply(RecordDict({p.METRICS: MetricRecord(metrics)}), Allowed(ph.EVALUATION.name))
    for leak in ("student_low.f1-benign", "student_low.f1-c8", "student_low.confusion-0-9", "site1_slide3.f1-c0"):
        with pytest.raises(EgressViolation, match="metric names not allowed"):
            check_reply(RecordDict({p.METRICS: MetricRecord({**metrics, leak: 1.0})}), Allowed(ph.EVALUATION.name))
    # the most a reply may carry: every per-class metric of every evaluated model at MAX_PER_CLASS classes
    k = per_class.MAX_PER_CLASS
    y = np.arange(4 * k) % k
    full = {ph.N_TEST: float(y.size), ph.NUM_EXAMPLES: float(y.size)}
    for model in ph.EVALUATED_MODELS:
        full.update({ph.model_metric(model, m): 0.5 for m in ph.EVALUATION_METRICS})
        full.update(per_class.site_metrics(model, y, _probs(rng, y, k)))
    check_reply(RecordDict({p.METRICS: MetricRecord(full)}), Allowed(ph.EVALUATION.name))


# --------------------------------------------------------------------------- one class order
def test_numeric_labels_order_by_value_at_the_sites_and_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedslide.server.protocol as protocol
    from tests.test_federation import federate, tiny_config

    sites = [make_site(tmp_path, f"site{i}", {"train": 4, "val": 2, "test": 2}, seed=i) for i in (1, 2)]
    for site in sites:
        text = (site / "labels.csv").read_text()
        (site / "labels.csv").write_text(text.replace(",neg,", ",10,").replace(",pos,", ",2,"))
    assert class_order(["10", "2"]) == ("2", "10") and class_order(["b", "a10", "a2"]) == ("a10", "a2", "b")
    assert read_labels(sites[0] / "labels.csv").classes == ("2", "10")

    class Stop(Exception):
        pass

    seen: list[tuple[str, ...]] = []

    def stop(fed: protocol.Federation) -> None:
        assert fed.facts is not None
        seen.append(fed.facts.classes)
        raise Stop

    monkeypatch.setattr(protocol, "_commit_handshake", stop)
    with pytest.raises(Stop):
        federate(sites, tiny_config(tmp_path, "order"))
    assert seen == [("2", "10")]  # as text it would be ("10", "2"): the sites' class 0 would be the server's 1


# --------------------------------------------------------------------------- distill's test predictions
def test_test_predictions_round_trip_with_awkward_class_names(tmp_path: Path) -> None:
    classes = ["normal", 'benign, "low"', "carcinoma"]
    rows: list[dict[str, str | float]] = [
        {"model": "teacher_high", "site": "s1", "slide_id": "a", "label": classes[1]}
        | {f"prob_{c}": v for c, v in zip(classes, (0.2, 0.7, 0.1))}
    ]
    write_test_predictions(tmp_path / "t.csv", rows, classes)
    names, back = read_test_predictions(tmp_path / "t.csv")
    assert names == classes and back[0]["label"] == classes[1] and float(back[0][f"prob_{classes[1]}"]) == 0.7


# --------------------------------------------------------------------------- in-process federation, 3 classes
@pytest.mark.slow
def test_federated_metrics_json_and_report_show_per_class_metrics_by_name(tmp_path: Path) -> None:
    from tests.test_federation import federate, tiny_config

    sites = [make_multiclass_site(tmp_path, f"site{i}", {"train": 9, "val": 3, "test": 6}, seed=i) for i in (1, 2)]
    order = ["normal", "benign", "carcinoma"]
    result, _ = federate(sites, tiny_config(tmp_path, "pc", classes=order))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    ys, ps = [], []
    for site in sites:
        with (site / "runs" / "pc" / "predictions.csv").open() as fh:
            for row in csv.DictReader(fh):
                ys.append(order.index(row["label"]))
                ps.append([float(v) for k, v in row.items() if k.startswith("student_low_p")])
        sent = set()
        for line in (site / "runs" / "pc" / "egress.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if entry["phase"] == "evaluate":
                sent |= {m.split(".", 1)[1] for m in entry["metrics"]}
        assert {"student_low.f1-c2", "teacher_high.auc-c0", "baseline_low.confusion-2-1"} <= sent
        assert not any(name in m for m in sent for name in order)  # indices leave, never class names
    y, pred = np.array(ys), np.array(ps).argmax(axis=1)
    table = metrics["models"]["student_low"]["per_class"]["overall"]
    assert table["classes"] == order
    assert table["confusion_matrix"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    f1 = f1_score(y, pred, labels=[0, 1, 2], average=None, zero_division=0.0)
    for k, name in enumerate(order):
        assert table["per_class"][name]["f1"] == pytest.approx(f1[k], abs=1e-9)
        assert table["per_class"][name]["support"] == 4
    report = (result.run_dir / "report.md").read_text()
    assert "## Per class" in report and "| carcinoma | 4 |" in report


# --------------------------------------------------------------------------- synth: clinical signal and lesion names
def test_clinical_signal_grows_with_the_class_index_and_binary_draws_are_unchanged() -> None:
    from fedslide.client.synth import clinical as cl

    assert cl.class_parameters(0, 2)[:2] == (56.0, 12.0) and cl.class_parameters(1, 2)[:2] == (63.0, 18.0)
    mid = cl.class_parameters(1, 3)
    assert mid[0] == pytest.approx(59.5) and 12.0 < mid[1] < 18.0 and mid[2].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="clinical class 3 of 3"):
        cl.clinical_rows([3], 0.0, np.random.default_rng(0), num_classes=3)
    # binary: the same draws as the two-class rule (labels 0/1 index AGE_MEAN, SIZE_MEDIAN_MM, GRADE_PROBS)
    labels = [0, 1, 1, 0, 1, 0, 0, 1]
    rng = np.random.default_rng(5)
    rng.permutation(len(labels))  # the missingness draw
    expected = []
    for y in labels:
        age = float(np.clip(rng.normal(cl.AGE_MEAN[y], cl.AGE_SD), 18.0, 100.0))
        size = float(np.clip(rng.lognormal(np.log(cl.SIZE_MEDIAN_MM[y]), cl.SIZE_LOG_SD), 0.5, 200.0))
        grade = str(rng.choice(3, p=cl.GRADE_PROBS[y]) + 1)
        er = "positive" if rng.random() < cl.ER_POSITIVE else "negative"
        expected.append([f"{age:.0f}", f"{size:.1f}", grade, er])
    assert cl.clinical_rows(labels, 0.0, np.random.default_rng(5)) == expected


def test_subtyping_clinical_table_orders_classes_by_severity(tmp_path: Path) -> None:
    from fedslide.client.synth.clinical import write_site_clinical
    from fedslide.client.synth.subtypes import task_labels

    names = task_labels("subtyping")
    labels = [names[i % 3] for i in range(1800)]
    write_site_clinical(tmp_path, [f"p{i}" for i in range(1800)], labels, 0.5, (0, 1, 8), names)
    with (tmp_path / "clinical.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh)]
    assert sum(r["age"] == "NA" for r in rows) == 900  # the site's missingness
    stats = []
    for name in names:
        present = [r for r, label in zip(rows, labels) if label == name and r["age"] != "NA"]
        stats.append(
            (
                np.mean([float(r["age"]) for r in present]),
                np.median([float(r["tumour_size"]) for r in present]),
                np.mean([int(r["grade"]) for r in present]),
            )
        )
    for lower, higher in zip(stats, stats[1:]):  # normal < benign < carcinoma on every signal column
        assert all(a < b for a, b in zip(lower, higher)), stats
    with pytest.raises(ValueError, match="not among the task's classes"):
        write_site_clinical(tmp_path, ["p1"], ["atypia"], 0.0, (0, 1, 8), names)


def test_synth_masks_name_the_lesion_class_and_heatmap_legends_use_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedslide.client.synth.clinical as clinical
    from fedslide.client.synth.cohort import generate_cohort
    from fedslide.common.config.synth import SynthConfig
    from fedslide.deploy.study.heatmaps import lesion_name, outline_label

    calls: list[tuple[list[str], tuple[str, ...]]] = []
    original = clinical.write_site_clinical

    def spy(site_dir, patients, labels, missingness, seed, classes=("normal", "tumor")):  # type: ignore[no-untyped-def]
        calls.append((list(labels), tuple(classes)))
        original(site_dir, patients, labels, missingness, seed, classes)

    monkeypatch.setattr(clinical, "write_site_clinical", spy)
    cfg = SynthConfig(
        out_dir=tmp_path / "c", sites=1, slides_per_site=3, seed=2, slide_size_um=(420.0, 480.0), progress=False,
        task="subtyping", clinical_missingness=[0.0],
    )  # fmt: skip
    (site,) = generate_cohort(cfg)
    assert calls and calls[0][1] == ("normal", "benign", "carcinoma")
    with (site / "labels.csv").open() as fh:
        labels = {r["slide_id"]: r["label"] for r in csv.DictReader(fh)}
    masks = json.loads((site / "masks" / "masks.json").read_text())["slides"]
    for sid, label in labels.items():
        assert masks[sid]["lesion"] == (None if label == "normal" else label)
        assert lesion_name(site, sid, "fallback") == (label if label != "normal" else "fallback")
    lesion = np.ones((2, 2), dtype=bool)
    assert outline_label((lesion, 4.0), "benign") == "benign (ground-truth mask)"
    assert outline_label((~lesion, 4.0), "benign") == "ground-truth mask: no lesion"
    assert outline_label(None, "benign") == "no ground-truth mask"
    assert lesion_name(tmp_path, "x", "carcinoma") == "carcinoma"  # no masks.json: the slide's label


@pytest.mark.slow
def test_distill_writes_the_test_predictions_its_metrics_come_from(tmp_path: Path) -> None:
    import argparse

    from fedslide.common.distillation.cli import add_parser
    from fedslide.common.metrics import classification_metrics
    from tests.test_multiclass import SMALL

    sites = [make_multiclass_site(tmp_path, f"site{i}", {"train": 6, "val": 3, "test": 3}, seed=30 + i) for i in (1, 2)]
    out = tmp_path / "run"
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["distill", "--sites", *map(str, sites), "--out", str(out), "--no-progress"]
    args = parser.parse_args(argv + [x for item in SMALL for x in ("--set", item)])
    assert args.handler(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    classes, rows = read_test_predictions(out / "test_predictions.csv")
    assert classes == metrics["classes"]
    for name, model in metrics["models"].items():
        mine = [r for r in rows if r["model"] == name]
        assert sorted((r["site"], r["slide_id"]) for r in mine) == [
            (s.name, f"{s.name}_test_{i}") for s in sites for i in range(3)
        ]
        y = np.array([classes.index(r["label"]) for r in mine])
        probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in mine])
        assert classification_metrics(y, probs)["auc"] == pytest.approx(model["test"]["auc"], abs=1e-9), name
