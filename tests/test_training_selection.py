"""Standardisation fitted on training folds, checkpoint selection rules, temperature scaling, repeated k-fold."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslide.common.metrics import expected_calibration_error
from fedslide.common.training.calibration import apply_temperature, fit_temperature, log_loss
from fedslide.common.training.checkpoint import load_model, predict_proba
from fedslide.common.training.cohort import load_cohort
from fedslide.common.training.labels import read_labels
from fedslide.common.training.loop import EarlyStopping
from fedslide.common.training.run import run_training
from fedslide.common.training.standardize import FeatureStats, fit_stats, standardize_enabled
from tests.test_training import DIM, train_config, write_bag


def raw_cohort(root: Path, n: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """Bags with no encoder attribute, on a raw scale (offset 50, spread 20), class signal on dim 0."""
    rng = np.random.default_rng(seed)
    features_dir, labels = root / "features", root / "labels.csv"
    rows = []
    for i in range(n):
        label = i % 2
        x = 50.0 + 20.0 * rng.normal(size=(int(rng.integers(5, 15)), DIM))
        x[:2, 0] += 60.0 * label
        write_bag(features_dir / f"B{i:02d}.h5", x.astype(np.float32), coords=False, attrs={"slide_id": f"B{i:02d}"})
        rows.append({"slide_id": f"B{i:02d}", "label": str(label)})
    with labels.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return features_dir, labels


# ---------------------------------------------------------------- standardisation


def test_standardize_auto_follows_the_encoder_attribute() -> None:
    assert standardize_enabled("auto", {}) and standardize_enabled("auto", {"encoder_name": ""})
    assert not standardize_enabled("auto", {"encoder_name": "uni"})
    assert standardize_enabled("on", {"encoder_name": "uni"}) and not standardize_enabled("off", {})


def test_stats_are_the_training_folds_and_travel_with_the_checkpoints(tmp_path: Path) -> None:
    features_dir, labels = raw_cohort(tmp_path)
    cfg = train_config(features_dir, labels, tmp_path / "out", epochs=3, calibration="none")
    report = run_training(cfg, progress=False)
    cohort = load_cohort(features_dir, read_labels(labels))
    everything = fit_stats(cohort, np.arange(len(cohort.slides)))
    for outcome in report.folds:
        split = outcome.split
        expected = fit_stats(cohort, split.train)
        assert outcome.stats is not None
        np.testing.assert_allclose(outcome.stats.mean, expected.mean, rtol=1e-6)
        np.testing.assert_allclose(outcome.stats.std, expected.std, rtol=1e-6)
        assert outcome.stats.count == sum(cohort.slides[i].num_instances for i in split.train)
        assert not np.allclose(outcome.stats.mean, everything.mean, rtol=1e-4)  # leakage would make them equal
        _, payload = load_model(tmp_path / "out" / "checkpoints" / f"repeat{split.repeat}_fold{split.fold}.pt")
        stored = FeatureStats.from_payload(payload["standardize"])
        assert stored is not None
        np.testing.assert_array_equal(stored.mean, outcome.stats.mean)
        np.testing.assert_array_equal(stored.std, outcome.stats.std)
        assert payload["temperature"] is None


def test_checkpoint_predictions_reproduce_the_runs_test_probabilities(tmp_path: Path) -> None:
    features_dir, labels = raw_cohort(tmp_path)
    cfg = train_config(features_dir, labels, tmp_path / "out", epochs=3)
    report = run_training(cfg, progress=False)
    cohort = load_cohort(features_dir, read_labels(labels))
    outcome = report.folds[1]
    model, payload = load_model(tmp_path / "out" / "checkpoints" / "repeat0_fold1.pt")
    assert payload["temperature"] == outcome.temperature and payload["temperature"] >= 1.0
    assert outcome.test is not None
    for index, probs in zip(outcome.test.indices, outcome.test.probs):
        features = torch.from_numpy(cohort.load(int(index))[0])[None]
        got = predict_proba(model, payload, features)[0].numpy()
        np.testing.assert_allclose(got, apply_temperature(probs[None], payload["temperature"])[0], atol=1e-5)


def test_standardize_off_leaves_raw_features(tmp_path: Path) -> None:
    features_dir, labels = raw_cohort(tmp_path)
    cfg = train_config(features_dir, labels, tmp_path / "out", epochs=2, standardize="off")
    report = run_training(cfg, progress=False)
    assert all(f.stats is None for f in report.folds)
    _, payload = load_model(tmp_path / "out" / "model.pt")
    assert payload["standardize"] is None


# ---------------------------------------------------------------- checkpoint selection


def select(curve: list[float], metric: str = "loss", patience: int = 0, **kw: int) -> tuple[int, int]:
    """(selected epoch, epochs run) of EarlyStopping fed `curve`."""
    stopper = EarlyStopping(metric, patience, **kw)  # type: ignore[arg-type]
    for epoch, value in enumerate(curve):
        stopper.update(epoch, value)
        if stopper.should_stop(epoch):
            return stopper.best_epoch, epoch + 1
    return stopper.best_epoch, len(curve)


# a lucky dip at epoch 1 on a noisy curve whose trend bottoms out around epochs 6-8
NOISY = [0.70, 0.30, 0.69, 0.60, 0.55, 0.45, 0.40, 0.38, 0.41, 0.45, 0.50, 0.55]


def test_plain_selection_takes_the_lucky_dip() -> None:
    assert select(NOISY) == (1, len(NOISY))


def test_moving_average_ignores_a_single_lucky_epoch() -> None:
    best, _ = select(NOISY, smoothing=3)
    # windows (ending at): 2: .563, 3: .530, 4: .613, 5: .533, 6: .467, 7: .410, 8: .397, 9: .413
    assert best == 8


def test_selection_min_epochs_skips_early_epochs() -> None:
    assert select(NOISY, start=3)[0] == 7
    assert select([0.1, 0.2, 0.3], start=2)[0] == 2  # only epoch 2 may be chosen


def test_auc_is_maximised_and_smoothed() -> None:
    curve = [0.5, 1.0, 0.6, 0.7, 0.8, 0.85, 0.8]
    assert select(curve, "auc")[0] == 1
    assert select(curve, "auc", smoothing=3)[0] == 6  # (.8+.85+.8)/3 beats (1+.6+.7)/3 and (.7+.8+.85)/3


def test_patience_counts_candidate_epochs_only() -> None:
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert select(rising, patience=2) == (0, 3)
    assert select(rising, patience=2, start=2) == (2, 5)
    assert select(rising, patience=2, smoothing=3) == (2, 5)


def test_nan_scores_never_win_once_a_candidate_exists() -> None:
    assert select([math.nan, 0.4, math.nan, 0.5], "auc")[0] in (0, 1)
    assert select([0.4, math.nan, 0.3], "loss")[0] == 2


def test_smoothing_in_a_real_run_is_recorded_in_the_selected_epoch(tmp_path: Path) -> None:
    features_dir, labels = raw_cohort(tmp_path)
    cfg = train_config(features_dir, labels, tmp_path / "out", epochs=5, selection_smoothing=2, selection_min_epochs=1)
    report = run_training(cfg, progress=False)
    for outcome in report.folds:
        losses = [r.val_loss for r in outcome.fit.history]
        windows = {e: (losses[e - 1] + losses[e]) / 2 for e in range(2, 5)}
        assert outcome.fit.best_epoch == min(windows, key=lambda e: (windows[e], e))
        assert outcome.fit.best_score == pytest.approx(windows[outcome.fit.best_epoch])


def test_selection_that_could_pick_nothing_is_refused_and_the_window_fits_the_epochs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="selection-min-epochs"):
        train_config(tmp_path, tmp_path / "l.csv", tmp_path, epochs=4, selection_min_epochs=4)
    cfg = train_config(tmp_path, tmp_path / "l.csv", tmp_path, epochs=4, selection_min_epochs=2)
    assert cfg.selection_smoothing == 5 and cfg.selection_window == 2  # train's default, shortened to fit


def test_train_smooths_selection_by_default_and_distill_does_not() -> None:
    from fedslide.common.config.distill import MILTrainingConfig

    assert MILTrainingConfig().selection_smoothing == 1


# ---------------------------------------------------------------- calibration


def overconfident(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predictions right 75% of the time, each with probability ~0.99 on its predicted class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    predicted = np.where(rng.random(n) < 0.75, labels, 1 - labels)
    margin = rng.normal(4.6, 0.3, n)
    logits = np.zeros((n, 2))
    logits[np.arange(n), predicted] = margin
    return torch.softmax(torch.from_numpy(logits), 1).numpy(), labels


def test_temperature_scaling_lowers_ece_and_log_loss_when_overconfident() -> None:
    probs, labels = overconfident()
    t = fit_temperature(probs, labels)
    assert t > 2.0
    calibrated = apply_temperature(probs, t)
    assert expected_calibration_error(labels, calibrated) < 0.5 * expected_calibration_error(labels, probs)
    assert log_loss(calibrated, labels) < 0.5 * log_loss(probs, labels)
    np.testing.assert_array_equal(calibrated.argmax(1), probs.argmax(1))  # ranking and accuracy unchanged
    held_out, held_labels = overconfident(seed=1)  # fitted on one split, it helps on another
    assert expected_calibration_error(held_labels, apply_temperature(held_out, t)) < expected_calibration_error(
        held_labels, held_out
    )


def test_temperature_never_sharpens_a_perfectly_separated_split() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert fit_temperature(probs, np.array([0, 1, 0])) == 1.0


# ---------------------------------------------------------------- repeated k-fold


def test_repeated_cv_reports_mean_and_sd_over_repeats(tmp_path: Path) -> None:
    features_dir, labels = raw_cohort(tmp_path)
    cfg = train_config(features_dir, labels, tmp_path / "out", epochs=2, cv_folds=3, repeats=2)
    report = run_training(cfg, progress=False)
    assert len(report.folds) == 6
    per_repeat = [np.mean([f.test_metrics["acc"] for f in report.folds if f.split.repeat == r]) for r in (0, 1)]
    stats = report.summary_repeats["test"]["acc"]
    assert stats["n"] == 2
    assert stats["mean"] == pytest.approx(np.mean(per_repeat))
    assert stats["sd"] == pytest.approx(np.std(per_repeat, ddof=1))


def test_cli_prints_the_repeated_kfold_summary_and_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import json

    from fedslide.common.training import cli as train_cli

    features_dir, labels = raw_cohort(tmp_path)
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    out = tmp_path / "out"
    argv = ["train", "--features", str(features_dir), "--labels", str(labels), "--out", str(out), "--model", "mean"]
    argv += ["--cv", "2", "--repeats", "2", "--epochs", "1", "--device", "cpu", "--no-progress"]
    args = parser.parse_args([*argv, "--set", "model.hidden-dim=16"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "mean ± sd over 2 repeats" in printed and "test T-scaled (repeats=2)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary_repeats"]["repeats"] == 2 and metrics["summary_repeats"]["test"]["acc"]["n"] == 2
    for fold in metrics["folds"]:  # before/after calibration, per fold, with the temperature that was applied
        assert fold["standardized"] and fold["temperature"] >= 1.0
        for key in ("ece", "brier", "loss"):
            assert math.isfinite(fold["test"][key]) and math.isfinite(fold["test_calibrated"][key])
        if fold["temperature"] == 1.0:
            assert fold["test_calibrated"]["ece"] == pytest.approx(fold["test"]["ece"])


def test_clip_bounds_an_outlier_on_a_near_constant_feature_and_travels_with_the_checkpoint(tmp_path: Path) -> None:
    features_dir, labels = raw_cohort(tmp_path)
    cohort = load_cohort(features_dir, read_labels(labels))
    stats = fit_stats(cohort, np.arange(len(cohort.slides)), clip=10.0)
    x = torch.from_numpy(np.array(stats.mean, copy=True))[None, None]  # one instance at the training mean
    x[..., 1] += 1e4 * float(stats.std[1])  # an outlier far outside the training spread
    z = stats.apply(x)
    assert float(z[..., 1]) == 10.0 and float(z[..., 0]) == pytest.approx(0.0, abs=1e-4)
    assert float(FeatureStats(stats.mean, stats.std, stats.count).apply(x)[..., 1]) == pytest.approx(1e4, rel=1e-3)
    restored = FeatureStats.from_payload(stats.to_payload())
    assert restored is not None and restored.clip == 10.0
    cfg = train_config(features_dir, labels, tmp_path / "out", epochs=1, cv_folds=2, standardize_clip=10.0)
    run_training(cfg, progress=False)
    _, payload = load_model(tmp_path / "out" / "model.pt")
    stored = FeatureStats.from_payload(payload["standardize"])
    assert stored is not None and stored.clip == 10.0
    assert train_config(features_dir, labels, tmp_path, standardize_clip=0.0).standardize_clip == 0.0
    report = run_training(
        train_config(features_dir, labels, tmp_path / "off", epochs=1, cv_folds=2, standardize_clip=0.0), progress=False
    )
    assert all(f.stats is not None and f.stats.clip is None for f in report.folds)  # 0 = no clamp


# ---------------------------------------------------------------- refit on train + val


def test_refit_epochs_is_the_median_selected_epoch_count() -> None:
    from fedslide.common.training.run import refit_epochs

    assert refit_epochs([2, 4, 9]) == 5  # counts 3, 5, 10
    assert refit_epochs([0, 1]) == 2  # counts 1, 2: median 1.5 rounds up
    assert refit_epochs([0]) == 1


def test_refit_trains_on_train_and_val_for_the_inner_cv_epochs(tmp_path: Path) -> None:
    import json

    from fedslide.common.training.run import refit_epochs

    features_dir, labels = raw_cohort(tmp_path)
    cfg = train_config(
        features_dir, labels, tmp_path / "out", epochs=4, cv_folds=2, refit=True, refit_folds=2, selection_smoothing=2
    )
    report = run_training(cfg, progress=False)
    cohort = load_cohort(features_dir, read_labels(labels))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for outcome, row in zip(report.folds, metrics["folds"]):
        split = outcome.split
        pool = np.sort(np.concatenate([split.train, split.val]))
        assert outcome.inner_epochs is not None and len(outcome.inner_epochs) == 2
        assert all(1 <= e < 4 for e in outcome.inner_epochs)  # smoothing 2: epoch 0 is never a candidate
        epochs = refit_epochs(outcome.inner_epochs)
        assert outcome.fit.epochs_run == epochs and len(outcome.fit.history) == epochs
        assert row["refit"] == {"epochs": epochs, "inner_best_epochs": outcome.inner_epochs}
        # "val" = each train+val slide once, held out by one inner fold; never a test slide
        np.testing.assert_array_equal(outcome.val.indices, pool)
        assert not set(outcome.val.indices) & set(split.test.tolist())
        # the refit model's standardisation is fitted on train + val (not the test fold)
        assert outcome.stats is not None
        np.testing.assert_allclose(outcome.stats.mean, fit_stats(cohort, pool).mean, rtol=1e-6)
        assert outcome.temperature is not None and outcome.temperature >= 1.0
        assert outcome.test is not None and len(outcome.test.indices) == split.test.size
    model, payload = load_model(tmp_path / "out" / "checkpoints" / "repeat0_fold0.pt")
    first = report.folds[0]
    assert first.test is not None and payload["epoch"] == first.fit.epochs_run - 1
    index, probs = int(first.test.indices[0]), first.test.probs[0]
    got = predict_proba(model, payload, torch.from_numpy(cohort.load(index)[0])[None])[0].numpy()
    np.testing.assert_allclose(got, apply_temperature(probs[None], payload["temperature"])[0], atol=1e-5)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # no batches
def test_a_fixed_epoch_fit_follows_the_full_schedule_without_validation() -> None:
    from fedslide.common.training.loop import fit, lr_factor

    from tests.test_training import train_config as make

    cfg = make(Path("f"), Path("l.csv"), Path("o"), epochs=10, scheduler="cosine", lr=1e-2)
    model = torch.nn.Linear(1, 1)
    result = fit(model, [], None, cfg, torch.device("cpu"), fixed_epochs=4)  # type: ignore[arg-type]
    assert result.epochs_run == 4 and result.best_epoch == 3
    assert [h.lr for h in result.history] == pytest.approx([1e-2 * lr_factor(cfg, e, 10) for e in range(4)])
    with pytest.raises(ValueError, match="validation loader"):
        fit(model, [], None, cfg, torch.device("cpu"))  # type: ignore[arg-type]


def test_refit_flag_sets_refit_and_its_folds(tmp_path: Path) -> None:
    import argparse

    from fedslide.common.cli_support import config_from_args
    from fedslide.common.config.train import TrainConfig
    from fedslide.common.training import cli as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    base = ["train", "--features", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path)]
    for extra, refit, folds in (([], False, 5), (["--refit"], True, 5), (["--refit", "3"], True, 3)):
        args = parser.parse_args([*base, *extra])
        cfg = config_from_args(TrainConfig, args, train_cli.SECTION, values=train_cli._cli_values(args))
        assert (cfg.refit, cfg.refit_folds, cfg.lr) == (refit, folds, 5e-4)
