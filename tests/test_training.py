"""`fedslide train`: labels, splits, padded batches, the training loop, outputs and bad input."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from fedslide.common.config.base import ConfigError, load_config
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.train import TrainConfig
from fedslide.common.training import cli as train_cli
from fedslide.common.training.checkpoint import load_checkpoint
from fedslide.common.training.cohort import load_cohort
from fedslide.common.training.data import BagDataset, collate_bags, eval_loader, train_loader
from fedslide.common.training.errors import (
    FeatureDataError,
    LabelsError,
    MissingDataError,
    SplitError,
)
from fedslide.common.training.labels import read_labels
from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.training.checkpoint import load_model
from fedslide.common.training.loop import EarlyStopping, evaluate
from fedslide.common.training.run import resolve_model_config, run_training
from fedslide.common.training.splits import cv_splits, given_splits

DIM = 16


class MeanPoolMIL(MILModel):
    """Stand-in MIL model: instance MLP, masked mean pooling, linear head."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 32, dropout: float = 0.0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None
    ) -> MILOutput:
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        h = self.encoder(features) * mask.unsqueeze(-1)
        embedding = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return MILOutput(logits=self.head(embedding), embedding=embedding, aux_loss=embedding.new_zeros(()))


def stand_in(model_cfg: ModelConfig) -> MILModel:
    return MeanPoolMIL(model_cfg.in_dim, model_cfg.num_classes, dropout=model_cfg.dropout)


def write_bag(path: Path, features: np.ndarray, coords: bool = True, attrs: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        if coords:
            f.create_dataset("coords", data=np.arange(2 * len(features), dtype=np.int64).reshape(-1, 2) * 256)
        for k, v in (attrs or {"encoder_name": "toy", "encoder_weights_hash": "abc", "slide_id": path.stem}).items():
            f.attrs[k] = v


def make_cohort(
    root: Path,
    n_patients: int = 20,
    slides_per_patient: int = 2,
    classes: tuple[str, ...] = ("benign", "tumor"),
    signal: float = 2.0,
    seed: int = 0,
    split_column: dict[str, str] | None = None,
    coords: bool = True,
) -> tuple[Path, Path]:
    """Bags of 10-40 instances; a class-c bag has a quarter of its instances shifted by `signal` on dims 2c..2c+1."""
    rng = np.random.default_rng(seed)
    features_dir, labels = root / "features", root / "labels.csv"
    rows = []
    for p in range(n_patients):
        c = p % len(classes)
        for s in range(slides_per_patient):
            slide_id = f"P{p:02d}_S{s}"
            n = int(rng.integers(10, 41))
            x = rng.normal(size=(n, DIM)).astype(np.float32)
            k = max(1, n // 4)
            x[:k, 2 * c : 2 * c + 2] += signal
            write_bag(features_dir / f"{slide_id}.h5", x, coords=coords)
            row = {"slide_id": slide_id, "label": classes[c], "patient_id": f"P{p:02d}"}
            if split_column is not None:
                row["split"] = split_column[f"P{p:02d}"]
            rows.append(row)
    with labels.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return features_dir, labels


def train_config(features_dir: Path, labels: Path, out: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = dict(
        features_dir=features_dir,
        labels=labels,
        out_dir=out,
        model=ModelConfig(name="abmil", dropout=0.0),
        epochs=8,
        batch_size=4,
        lr=3e-3,
        cv_folds=3,
        early_stopping_patience=0,
        device="cpu",
        scheduler="none",
    )
    values.update(kw)
    return TrainConfig(**values)


# ---------------------------------------------------------------- labels and config


def test_labels_sorted_numeric_aware_and_patient_fallback(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,10\nb,2\nc,2\nd,1\n")
    table = read_labels(path)
    assert table.classes == ("1", "2", "10")
    assert table.label_map == {"1": 0, "2": 1, "10": 2}
    assert [r.patient_id for r in table.rows] == ["a", "b", "c", "d"]
    assert not table.has_split


def test_labels_problems_name_lines_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label,split\na,x,train\nb,y,holdout\na,x,test\nc,,train\n")
    with pytest.raises(LabelsError) as err:
        read_labels(path)
    text = str(err.value)
    assert "line 3" in text and "'holdout'" in text and "'b'" in text
    assert "duplicate slide_id(s): 'a' (lines 2 and 4)" in text
    assert "'c' has an empty label" in text
    (tmp_path / "bad.csv").write_text("slide,diagnosis\na,x\n")
    with pytest.raises(LabelsError, match="missing column"):
        read_labels(tmp_path / "bad.csv")


def test_train_config_from_toml_and_model_dims(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        '[train]\nfeatures-dir = "f"\nlabels = "l.csv"\nout-dir = "o"\nearly-stopping-metric = "auc"\n'
        '[train.model]\nname = "abmil"\n'
    )
    cfg = load_config(TrainConfig, toml, section="train", overrides=["grad-accum=2", "model.dropout=0.1"])
    assert cfg.early_stopping_metric == "auc" and cfg.grad_accum == 2 and cfg.model.dropout == 0.1
    resolved = resolve_model_config(cfg.model, feature_dim=DIM, num_classes=3)
    assert resolved.in_dim == DIM and resolved.num_classes == 3
    with pytest.raises(ConfigError, match="model.in-dim = 8 but the feature files give 16"):
        resolve_model_config(ModelConfig(name="abmil", in_dim=8), feature_dim=DIM, num_classes=2)
    with pytest.raises(ConfigError, match="unknown key 'train.batchsize'"):
        load_config(TrainConfig, toml, section="train", overrides=["batchsize=3"])


# ---------------------------------------------------------------- splits


def _patients_of(groups: np.ndarray, idx: np.ndarray) -> set[str]:
    return set(groups[idx].tolist())


def test_cv_folds_are_patient_disjoint_stratified_and_cover_all() -> None:
    rng = np.random.default_rng(1)
    n_patients = 30
    patient_labels = np.array([0] * 18 + [1] * 12)
    per_patient = rng.integers(1, 4, size=n_patients)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], per_patient).astype(object)
    labels = np.repeat(patient_labels, per_patient)
    folds = cv_splits(labels, groups, folds=5, repeats=2, seed=3, val_fraction=0.25)
    assert len(folds) == 10
    for repeat in (0, 1):
        tested = np.concatenate([f.test for f in folds if f.repeat == repeat])
        assert sorted(tested.tolist()) == list(range(len(labels)))  # every slide tested exactly once
    for f in folds:
        tr, va, te = (_patients_of(groups, f.train), _patients_of(groups, f.val), _patients_of(groups, f.test))
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert len(f.train) + len(f.val) + len(f.test) == len(labels)
        assert set(labels[f.test].tolist()) == {0, 1}
        assert set(labels[f.val].tolist()) == {0, 1}
    first = [f.test.tolist() for f in folds if f.repeat == 0]
    second = [f.test.tolist() for f in folds if f.repeat == 1]
    assert first != second
    again = cv_splits(labels, groups, folds=5, repeats=2, seed=3, val_fraction=0.25)
    assert all(np.array_equal(a.test, b.test) and np.array_equal(a.val, b.val) for a, b in zip(folds, again))


def test_given_splits_respected_and_val_carved_when_absent() -> None:
    names = ["train"] * 12 + ["val"] * 4 + ["test"] * 4
    labels = np.array([0, 1] * 10)
    groups = np.array([f"p{i}" for i in range(20)], dtype=object)
    (split,) = given_splits(names, labels, groups, repeats=1, seed=0, val_fraction=0.25)
    assert split.train.tolist() == list(range(12))
    assert split.val.tolist() == list(range(12, 16)) and split.test.tolist() == list(range(16, 20))
    no_val = ["train"] * 16 + ["test"] * 4
    a, b = given_splits(no_val, labels, groups, repeats=2, seed=0, val_fraction=0.25)
    for s in (a, b):
        assert s.test.tolist() == list(range(16, 20))
        assert sorted(s.train.tolist() + s.val.tolist()) == list(range(16))
        assert len(s.val) == 4 and set(labels[s.val].tolist()) == {0, 1}
    assert a.seed != b.seed


# ---------------------------------------------------------------- batches


def test_collate_pads_with_zeros_and_masks(tmp_path: Path) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=4, slides_per_patient=1)
    cohort = load_cohort(features_dir, read_labels(labels))
    items = [BagDataset(cohort, range(4))[i] for i in range(4)]
    batch = collate_bags(items)
    lengths = [it.features.shape[0] for it in items]
    assert batch.features.shape == (4, max(lengths), DIM) and batch.coords is not None
    for b, (item, n) in enumerate(zip(items, lengths)):
        assert batch.mask[b].tolist() == [True] * n + [False] * (max(lengths) - n)
        assert torch.equal(batch.features[b, :n], item.features)
        assert torch.count_nonzero(batch.features[b, n:]) == 0 and torch.count_nonzero(batch.coords[b, n:]) == 0
    assert batch.labels.tolist() == [s.label for s in cohort.slides]


def test_batched_eval_equals_one_bag_at_a_time(tmp_path: Path) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=10, slides_per_patient=1)
    cohort = load_cohort(features_dir, read_labels(labels))
    torch.manual_seed(0)
    model = MeanPoolMIL(DIM, 2)
    loss = nn.CrossEntropyLoss()
    ds = BagDataset(cohort, range(10))
    batched = evaluate(model, eval_loader(ds, 4), loss, torch.device("cpu"))
    single = evaluate(model, eval_loader(ds, 1), loss, torch.device("cpu"))
    assert batched.indices.tolist() == list(range(10))
    np.testing.assert_allclose(batched.probs, single.probs, rtol=1e-5, atol=1e-6)
    assert batched.loss == pytest.approx(single.loss, rel=1e-5)


def test_instance_cap_and_seeded_batch_order(tmp_path: Path) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=12, slides_per_patient=1)
    cohort = load_cohort(features_dir, read_labels(labels))
    ds = BagDataset(cohort, range(12), max_instances=8)
    assert all(ds[i].features.shape[0] == min(8, cohort.slides[i].num_instances) for i in range(12))

    def order(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        return [b.indices.tolist() for _ in range(2) for b in train_loader(ds, 4, seed)]

    assert order(5) == order(5)
    assert order(5) != order(6)
    assert sorted(sum(order(5)[:3], [])) == list(range(12))  # one epoch covers every bag once


# ---------------------------------------------------------------- training runs


def test_training_learns_and_writes_documented_outputs(tmp_path: Path) -> None:
    features_dir, labels = make_cohort(tmp_path)
    cfg = train_config(features_dir, labels, tmp_path / "out", repeats=1)
    report = run_training(cfg, model_factory=stand_in, progress=False)
    assert report.split_mode == "cv" and len(report.folds) == 3
    assert report.summary["val"]["auc"]["mean"] > 0.9
    assert report.summary["test"]["auc"]["mean"] > 0.9

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["schema"] == "fedslide.train.metrics/1"
    assert metrics["label_map"] == {"benign": 0, "tumor": 1} and metrics["classes"] == ["benign", "tumor"]
    assert metrics["feature_dim"] == DIM and metrics["num_slides"] == 40
    assert metrics["config"]["cv-folds"] == 3 and metrics["model"]["in_dim"] == DIM
    assert metrics["encoder"] == {"encoder_name": "toy", "encoder_weights_hash": "abc"}
    assert len(metrics["folds"]) == 3
    for fold in metrics["folds"]:
        assert {
            "repeat",
            "fold",
            "seed",
            "n_train",
            "n_val",
            "n_test",
            "best_epoch",
            "epochs_run",
            "stopped_early",
        } <= set(fold)
        assert fold["n_train"] + fold["n_val"] + fold["n_test"] == 40
        assert set(fold["test"]) == {"auc", "acc", "balanced_acc", "f1", "brier", "ece", "loss"}
    assert set(metrics["summary"]) == {"val", "test", "test_calibrated"}
    assert set(metrics["summary"]["test"]["auc"]) == {"mean", "sd", "n"}
    for fold in metrics["folds"]:  # the toy encoder is named in the files: 'auto' leaves its features as they are
        assert fold["standardized"] is False and fold["temperature"] >= 1.0
        assert set(fold["test_calibrated"]) == set(fold["test"])

    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["fold", "repeat", "split", "slide_id", "label", "prob_benign", "prob_tumor", "predicted"]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert sorted(r["slide_id"] for r in test_rows) == sorted(
        s.slide_id for s in load_cohort(features_dir, read_labels(labels)).slides
    )
    for r in rows:
        assert float(r["prob_benign"]) + float(r["prob_tumor"]) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == ("tumor" if float(r["prob_tumor"]) > float(r["prob_benign"]) else "benign")
    assert len([r for r in rows if r["split"] == "val"]) == sum(f["n_val"] for f in metrics["folds"])

    ckpt = load_checkpoint(tmp_path / "out" / "model.pt")
    assert ckpt["label_map"] == {"benign": 0, "tumor": 1} and ckpt["feature_dim"] == DIM
    assert ckpt["model_config"]["in_dim"] == DIM and ckpt["model_config"]["num_classes"] == 2
    assert ckpt["encoder"]["encoder_name"] == "toy"
    model = stand_in(ModelConfig.model_validate(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    best = metrics["best_checkpoint"]
    assert (best["repeat"], best["fold"]) == (ckpt["repeat"], ckpt["fold"])
    assert len(list((tmp_path / "out" / "checkpoints").glob("*.pt"))) == 3
    assert (tmp_path / "out" / "history.csv").read_text().startswith("repeat,fold,epoch,train_loss")


def test_same_seed_same_metrics_and_other_knobs_run(tmp_path: Path) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=12, coords=False)
    knobs = dict(
        epochs=3,
        cv_folds=2,
        repeats=2,
        max_instances=12,
        grad_accum=2,
        class_weighting="balanced",
        optimizer="sgd",
        scheduler="cosine",
        early_stopping_metric="auc",
        max_grad_norm=1.0,
        save_fold_checkpoints=False,
        val_fraction=0.5,
    )
    runs = []
    for name, preload in (("a", True), ("b", False)):  # bags kept in memory or read per epoch: same result
        cfg = train_config(features_dir, labels, tmp_path / name, preload=preload, **knobs)
        run_training(cfg, model_factory=stand_in, progress=False)
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0]["folds"] == runs[1]["folds"] and runs[0]["summary"] == runs[1]["summary"]
    assert len(runs[0]["folds"]) == 4
    assert (tmp_path / "a" / "predictions.csv").read_text() == (tmp_path / "b" / "predictions.csv").read_text()
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_early_stopping_stops_when_validation_does_not_improve(tmp_path: Path) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=12)
    # lr this small leaves float32 weights unchanged, so the validation loss never improves after epoch 0
    cfg = train_config(
        features_dir,
        labels,
        tmp_path / "out",
        epochs=20,
        lr=1e-12,
        cv_folds=2,
        early_stopping_patience=2,
        selection_smoothing=1,
    )
    report = run_training(cfg, model_factory=stand_in, progress=False)
    for fold in report.folds:
        assert fold.fit.epochs_run == 3 and fold.fit.best_epoch == 0 and fold.fit.stopped_early

    stopper = EarlyStopping("auc", patience=2, min_epochs=5)
    for epoch, value in enumerate([0.6, 0.7, 0.65, 0.7, 0.69]):
        stopper.update(epoch, value)
    assert stopper.best_epoch == 1 and stopper.bad_epochs == 3
    assert not stopper.should_stop(3) and stopper.should_stop(4)


def test_given_splits_train_on_train_and_report_test(tmp_path: Path) -> None:
    split = {f"P{p:02d}": "train" if p < 12 else ("val" if p < 16 else "test") for p in range(20)}
    features_dir, labels = make_cohort(tmp_path, split_column=split)
    report = run_training(
        train_config(features_dir, labels, tmp_path / "out", epochs=3), model_factory=stand_in, progress=False
    )
    assert report.split_mode == "given" and len(report.folds) == 1
    (fold,) = report.folds
    cohort = load_cohort(features_dir, read_labels(labels))
    tested = {cohort.slides[i].slide_id for i in fold.test.indices}
    assert tested == {f"P{p:02d}_S{s}" for p in range(16, 20) for s in range(2)}
    assert {cohort.slides[i].patient_id for i in fold.split.train} == {f"P{p:02d}" for p in range(12)}


def test_carve_splits_without_split_column_by_patient_kept_beside_the_labels(tmp_path: Path) -> None:
    features_dir, labels = make_cohort(tmp_path)  # 20 patients x 2 slides, no split column
    cfg = train_config(features_dir, labels, tmp_path / "out", epochs=2, splits="carve")
    report = run_training(cfg, model_factory=stand_in, progress=False)
    assert report.split_mode == "carved" and len(report.folds) == 1
    with (tmp_path / "splits.csv").open(newline="") as handle:
        kept = {row["slide_id"]: row["split"] for row in csv.DictReader(handle)}
    (fold,) = report.folds
    cohort = load_cohort(features_dir, read_labels(labels))
    for name, idx in (("train", fold.split.train), ("val", fold.split.val), ("test", fold.split.test)):
        assert {cohort.slides[i].slide_id for i in idx} == {sid for sid, s in kept.items() if s == name}
        assert set(cohort.labels[idx].tolist()) == {0, 1}
    patients: dict[str, set[str]] = {}
    for sid, split in kept.items():
        patients.setdefault(sid.split("_")[0], set()).add(split)
    assert all(len(s) == 1 for s in patients.values())  # a patient's slides stay together
    again = run_training(cfg.model_copy(update={"out_dir": tmp_path / "again"}), model_factory=stand_in, progress=False)
    assert np.array_equal(again.folds[0].split.test, fold.split.test)


def test_multiclass_run_writes_one_probability_per_class(tmp_path: Path) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=18, classes=("a", "b", "c"), signal=3.0)
    cfg = train_config(features_dir, labels, tmp_path / "out", epochs=6, early_stopping_metric="auc", val_fraction=0.34)
    report = run_training(cfg, model_factory=stand_in, progress=False)
    assert report.summary["test"]["auc"]["mean"] > 0.8
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [k for k in rows[0] if k.startswith("prob_")] == ["prob_a", "prob_b", "prob_c"]
    assert {r["label"] for r in rows} == {"a", "b", "c"}


# ---------------------------------------------------------------- bad input


def test_labels_without_features_and_features_without_labels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=6)
    (features_dir / "P00_S0.h5").unlink()
    write_bag(features_dir / "stray.h5", np.zeros((3, DIM), np.float32))
    with pytest.raises(MissingDataError) as err:
        load_cohort(features_dir, read_labels(labels))
    text = str(err.value)
    assert "have no feature file" in text and "P00_S0" in text
    assert "have no row in" in text and "stray" in text and "--allow-missing" in text
    with caplog.at_level(logging.WARNING):
        cohort = load_cohort(features_dir, read_labels(labels), allow_missing=True)
    assert len(cohort.slides) == 11 and "P00_S0" in caplog.text and "stray" in caplog.text


@pytest.mark.parametrize("problem", ["empty", "nan", "dim", "unreadable", "no_features", "encoder"])
def test_bad_feature_files_are_named(tmp_path: Path, problem: str) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=6)
    bad = features_dir / "P03_S1.h5"
    if problem == "empty":
        write_bag(bad, np.zeros((0, DIM), np.float32))
        expected = "empty feature file"
    elif problem == "nan":
        x = np.ones((5, DIM), np.float32)
        x[2, 3] = np.nan
        write_bag(bad, x)
        expected = "1 NaN/Inf value(s)"
    elif problem == "dim":
        write_bag(bad, np.ones((5, DIM + 1), np.float32))
        expected = f"dim {DIM + 1} in 1 file(s): {bad}"
    elif problem == "unreadable":
        bad.write_bytes(b"not an h5 file")
        expected = "not a readable h5 file"
    elif problem == "no_features":
        with h5py.File(bad, "w") as f:
            f.create_dataset("feats", data=np.ones((3, DIM)))
        expected = "no 'features' dataset"
    else:
        write_bag(bad, np.ones((5, DIM), np.float32), attrs={"encoder_name": "other", "encoder_weights_hash": "zzz"})
        expected = f"other/zzz in 1 file(s): {bad}"
    with pytest.raises(FeatureDataError) as err:
        run_training(train_config(features_dir, labels, tmp_path / "out"), model_factory=stand_in, progress=False)
    assert expected in str(err.value) and str(bad) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_single_class_training_split_is_refused(tmp_path: Path) -> None:
    # patients 0, 2, 4, ... are benign: make every train patient benign
    split = {f"P{p:02d}": ("train" if p % 2 == 0 else "test") for p in range(8)}
    split.update({"P00": "train", "P01": "val", "P02": "val"})
    features_dir, labels = make_cohort(tmp_path, n_patients=8, split_column=split)
    with pytest.raises(SplitError) as err:
        run_training(train_config(features_dir, labels, tmp_path / "out"), model_factory=stand_in, progress=False)
    assert "repeat 0 fold 0: the training split has a single class (benign)" in str(err.value)
    assert "P04_S0" in str(err.value)


def test_cli_maps_bad_input_to_exit_code_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=4)
    (features_dir / "P01_S1.h5").unlink()
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "--features", str(features_dir), "--labels", str(labels), "--out", str(tmp_path / "o"), "--cv", "2"]
    )
    assert args.handler(args) == 2
    err = capsys.readouterr().err
    assert "fedslide train:" in err and "P01_S1" in err


def test_end_to_end_with_registered_abmil(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    features_dir, labels = make_cohort(tmp_path, n_patients=16)
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "train",
            "--features",
            str(features_dir),
            "--labels",
            str(labels),
            "--out",
            str(out),
            "--model",
            "abmil",
            "--cv",
            "2",
            "--epochs",
            "6",
            "--batch-size",
            "4",
            "--lr",
            "2e-3",
            "--device",
            "cpu",
            "--no-progress",
            "--dropout",
            "0",
            "--set",
            "model.hidden-dim=64",
            "--set",
            'scheduler="none"',
        ]
    )
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "auc" in printed and "±" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["name"] == "abmil" and len(metrics["folds"]) == 2
    assert all(math.isfinite(f["test"]["auc"]) for f in metrics["folds"])
    assert metrics["summary"]["test"]["auc"]["mean"] > 0.8
    model, payload = load_model(out / "model.pt")
    assert payload["classes"] == ["benign", "tumor"]
    x = torch.randn(2, 7, DIM)
    assert model(x, mask=torch.ones(2, 7, dtype=torch.bool)).logits.shape == (2, 2)


def test_models_whose_aux_loss_uses_labels_get_them_in_training_only() -> None:
    import torch

    from fedslide.common.models.base import MILModel, MILOutput
    from fedslide.common.training.data import BagBatch
    from fedslide.common.training.loop import _forward

    class Recorder(MILModel):
        accepts_labels = True

        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.seen: list[object] = []

        def forward(self, features, mask=None, coords=None, labels=None):  # type: ignore[override]
            self.seen.append(labels)
            return MILOutput(logits=self.lin(features.mean(1)), embedding=features.mean(1))

    model = Recorder()
    batch = BagBatch(
        features=torch.ones(2, 3, 4),
        mask=torch.ones(2, 3, dtype=torch.bool),
        coords=None,
        labels=torch.tensor([0, 1]),
        indices=torch.tensor([0, 1]),
    )
    model.train()
    _forward(model, batch)
    model.eval()
    _forward(model, batch)
    assert torch.equal(model.seen[0], torch.tensor([0, 1])) and model.seen[1] is None
