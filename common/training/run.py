"""A whole training run: check inputs, split, train every fold, write metrics, predictions and checkpoints."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedslide.common.config.base import ConfigError
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.train import TrainConfig
from fedslide.common.device import resolve_device
from fedslide.common.metrics import classification_metrics, roc_auc, summarize
from fedslide.common.models.base import MILModel
from fedslide.common.training import outputs
from fedslide.common.training.calibration import apply_temperature, fit_temperature, log_loss
from fedslide.common.training.checkpoint import save_checkpoint
from fedslide.common.training.cohort import Cohort, load_cohort
from fedslide.common.training.data import BagDataset, eval_loader, train_loader
from fedslide.common.training.labels import read_labels
from fedslide.common.training.loop import (
    EvalResult,
    FitResult,
    class_weights,
    evaluate,
    fit,
)
from fedslide.common.training.repro import deterministic_torch, seed_everything
from fedslide.common.training.standardize import FeatureStats, fit_stats, standardize_enabled
from fedslide.common.training.splits import (
    FoldSplit,
    check_splits,
    cv_splits,
    given_splits,
    inner_folds,
    site_splits,
)

log = logging.getLogger(__name__)

ModelFactory = Callable[[ModelConfig], MILModel]  # resolved model config -> fresh model
INNER_SEED_STEP = 100_000  # refit: inner fold k trains with the fold's seed + (k + 1) * this


@dataclass
class FoldOutcome:
    """One trained fold: its split, training record and best-epoch results."""

    split: FoldSplit
    fit: FitResult
    val: EvalResult
    test: EvalResult | None
    val_metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    stats: FeatureStats | None = None  # standardisation fitted on split.train
    temperature: float | None = None  # fitted on the validation split
    val_calibrated: dict[str, float] | None = None
    test_calibrated: dict[str, float] | None = None
    inner_epochs: list[int] | None = None  # refit: the selected epoch (0-based) of each inner fold

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint of this fold stores besides the weights: where it came from, stats, temperature."""
        return dict(
            repeat=self.split.repeat,
            fold=self.split.fold,
            epoch=self.fit.best_epoch,
            val_metrics=outputs.json_safe(self.val_metrics),
            standardize=None if self.stats is None else self.stats.to_payload(),
            temperature=self.temperature,
        )


@dataclass
class TrainingReport:
    """What a run produced (everything is also on disk under out_dir)."""

    out_dir: Path
    classes: tuple[str, ...]
    split_mode: str
    folds: list[FoldOutcome]
    summary: dict[str, dict[str, dict[str, float]]]
    files: dict[str, Path] = field(default_factory=dict)
    summary_repeats: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # over repeat means


def resolve_model_config(model_cfg: ModelConfig, feature_dim: int, num_classes: int) -> ModelConfig:
    """The model config with in_dim and num_classes taken from the data; explicit values must agree."""
    data = model_cfg.model_dump()
    explicit = model_cfg.model_fields_set
    for key, actual, source in (
        ("in_dim", feature_dim, "the feature files"),
        ("num_classes", num_classes, "the labels"),
    ):
        given = data.get(key)
        if given and key in explicit and int(given) != actual:
            raise ConfigError(f"model.{key.replace('_', '-')} = {given} but {source} give {actual}; leave it unset")
        data[key] = actual
    return type(model_cfg).model_validate(data)


def default_model_factory(model_cfg: ModelConfig) -> MILModel:
    """Build the configured model through the model registry."""
    from fedslide.common.models.registry import build_model

    return build_model(model_cfg)


def plan_splits(cfg: TrainConfig, cohort: Cohort, has_split_column: bool) -> tuple[str, list[FoldSplit]]:
    """('cv' | 'given' | 'carved', the folds), checked to be trainable."""
    mode: str = cfg.splits if cfg.splits != "auto" else ("given" if has_split_column else "cv")
    labels, groups = cohort.labels, cohort.groups
    if mode == "carve":
        mode = "given" if has_split_column else "carved"
    if mode == "carved":  # one test/val split, carved by the rule every stage shares and kept beside the labels
        table = read_labels(cfg.labels)
        c = cfg.carve
        carved = site_splits(Path(cfg.labels).parent, table, c.test_fraction, c.val_fraction, c.seed) or {}
        names = [carved[s.slide_id] for s in cohort.slides]
        folds = given_splits(names, labels, groups, cfg.repeats, cfg.seed, cfg.val_fraction)
    elif mode == "given":
        if not has_split_column:
            raise ConfigError('splits = "given" but the labels CSV has no split column')
        folds = given_splits([s.split for s in cohort.slides], labels, groups, cfg.repeats, cfg.seed, cfg.val_fraction)
    else:
        folds = cv_splits(labels, groups, cfg.cv_folds, cfg.repeats, cfg.seed, cfg.val_fraction)
    check_splits(
        folds,
        labels,
        cohort.classes,
        [s.slide_id for s in cohort.slides],
        val_needs_all_classes=cfg.early_stopping_metric == "auc",
    )
    return mode, folds


@dataclass
class _Fitted:
    model: MILModel
    stats: FeatureStats | None
    fit: FitResult
    weights: torch.Tensor | None


def _fit_on(
    cfg: TrainConfig,
    cohort: Cohort,
    train: np.ndarray,
    val: np.ndarray | None,
    seed: int,
    model_cfg: ModelConfig,
    factory: ModelFactory,
    device: torch.device,
    progress: bool | None,
    description: str,
    fixed_epochs: int | None = None,
) -> _Fitted:
    """A model trained on the slides `train`: standardisation fitted on them, the epoch selected on `val` (or
    `fixed_epochs` without selection); the model holds the selected weights."""
    seed_everything(seed)
    model = factory(model_cfg)
    stats = (
        fit_stats(cohort, train, cfg.standardize_clip or None)
        if standardize_enabled(cfg.standardize, cohort.encoder_attrs)
        else None
    )
    train_ds = BagDataset(cohort, train, max_instances=cfg.max_instances, stats=stats)
    weights = class_weights(cohort.labels[train], len(cohort.classes), cfg.class_weighting)
    loader = train_loader(train_ds, cfg.batch_size, seed, cfg.num_workers, cfg.group_by_length)
    val_loader = None if val is None else _loader(cfg, cohort, val, stats)
    result = fit(model, loader, val_loader, cfg, device, weights, progress, description, fixed_epochs=fixed_epochs)
    model.load_state_dict(result.best_state)
    return _Fitted(model, stats, result, weights)


def _loader(cfg: TrainConfig, cohort: Cohort, indices: np.ndarray, stats: FeatureStats | None) -> DataLoader:
    return eval_loader(BagDataset(cohort, indices, stats=stats), cfg.resolved_eval_batch_size, cfg.num_workers)


def _evaluate_on(
    cfg: TrainConfig, cohort: Cohort, fitted: _Fitted, indices: np.ndarray, device: torch.device
) -> EvalResult:
    loss_fn = torch.nn.CrossEntropyLoss(weight=fitted.weights)
    return evaluate(fitted.model, _loader(cfg, cohort, indices, fitted.stats), loss_fn, device)


def _pooled(results: list[EvalResult], weights: torch.Tensor | None) -> EvalResult:
    """Held-out predictions of several inner folds as one result in cohort-index order; loss: (weighted) CE."""
    indices = np.concatenate([r.indices for r in results])
    order = np.argsort(indices)
    labels = np.concatenate([r.labels for r in results])[order]
    probs = np.concatenate([r.probs for r in results])[order]
    log_probs = torch.log(torch.as_tensor(probs).clamp_min(1e-12))
    loss = float(
        torch.nn.functional.nll_loss(
            log_probs, torch.as_tensor(labels), weight=None if weights is None else weights.double()
        )
    )
    return EvalResult(indices=indices[order], labels=labels, probs=probs, loss=loss)


def refit_epochs(best_epochs: list[int]) -> int:
    """Epochs of a refit: the median (rounded half up) of the inner folds' selected epoch counts."""
    return int(math.floor(float(np.median([e + 1 for e in best_epochs])) + 0.5))


def _train_fold(
    cfg: TrainConfig,
    cohort: Cohort,
    split: FoldSplit,
    model_cfg: ModelConfig,
    factory: ModelFactory,
    device: torch.device,
    progress: bool | None,
) -> FoldOutcome:
    inner_epochs: list[int] | None = None
    if cfg.refit:
        pool = np.sort(np.concatenate([split.train, split.val]))
        held_out, inner_epochs = [], []
        for k, (tr, held) in enumerate(inner_folds(pool, cohort.labels, cohort.groups, cfg.refit_folds, split.seed)):
            inner = _fit_on(
                cfg,
                cohort,
                tr,
                held,
                split.seed + INNER_SEED_STEP * (k + 1),
                model_cfg,
                factory,
                device,
                progress,
                f"{split.name} inner {k}",
            )
            inner_epochs.append(inner.fit.best_epoch)
            held_out.append(_evaluate_on(cfg, cohort, inner, held, device))
        fitted = _fit_on(
            cfg,
            cohort,
            pool,
            None,
            split.seed,
            model_cfg,
            factory,
            device,
            progress,
            f"{split.name} refit",
            fixed_epochs=refit_epochs(inner_epochs),
        )
        val = _pooled(held_out, fitted.weights)
        fitted.fit.best_score = val.loss if cfg.early_stopping_metric == "loss" else roc_auc(val.labels, val.probs)
    else:
        fitted = _fit_on(
            cfg, cohort, split.train, split.val, split.seed, model_cfg, factory, device, progress, split.name
        )
        val = _evaluate_on(cfg, cohort, fitted, split.val, device)
    test = _evaluate_on(cfg, cohort, fitted, split.test, device) if split.test.size else None
    outcome = FoldOutcome(
        split=split,
        fit=fitted.fit,
        val=val,
        test=test,
        val_metrics=_metrics(val, cfg.ece_bins),
        test_metrics=None if test is None else _metrics(test, cfg.ece_bins),
        stats=fitted.stats,
        inner_epochs=inner_epochs,
    )
    if cfg.calibration == "temperature":
        t = outcome.temperature = fit_temperature(val.probs, val.labels)
        outcome.val_calibrated = _calibrated_metrics(val, t, cfg.ece_bins)
        outcome.test_calibrated = None if test is None else _calibrated_metrics(test, t, cfg.ece_bins)
    return outcome


def _metrics(result: EvalResult, ece_bins: int) -> dict[str, float]:
    return {**classification_metrics(result.labels, result.probs, ece_bins), "loss": result.loss}


def _calibrated_metrics(result: EvalResult, temperature: float, ece_bins: int) -> dict[str, float]:
    probs = apply_temperature(result.probs, temperature)
    return {**classification_metrics(result.labels, probs, ece_bins), "loss": log_loss(probs, result.labels)}


def _per_repeat(folds: list[FoldOutcome], pick: Callable[[FoldOutcome], dict[str, float] | None]) -> dict[str, Any]:
    """Mean ± sd over repeats of each repeat's mean over its folds (the papers' repeated k-fold summary)."""
    by_repeat: dict[int, list[dict[str, float]]] = {}
    for f in folds:
        metrics = pick(f)
        if metrics is not None:
            by_repeat.setdefault(f.split.repeat, []).append(metrics)
    means = [{k: v["mean"] for k, v in summarize(rows).items()} for _, rows in sorted(by_repeat.items())]
    return summarize(means) if means else {}


def _better(metric: str, score: float, best: float | None) -> bool:
    if best is None:
        return True
    if math.isnan(score):
        return False
    return score < best if metric == "loss" else score > best


def run_training(
    cfg: TrainConfig, model_factory: ModelFactory | None = None, progress: bool | None = None
) -> TrainingReport:
    """Train and evaluate every fold of every repeat; write outputs to cfg.out_dir.

    Raises TrainingInputError subclasses (naming files/ids) before any training when inputs are bad.
    `progress` None shows tqdm bars only on a terminal.
    """
    table = read_labels(cfg.labels)
    cohort = load_cohort(
        cfg.features_dir, table, allow_missing=cfg.allow_missing, preload=cfg.preload, layout=cfg.features_layout
    )
    model_cfg = resolve_model_config(cfg.model, cohort.feature_dim, len(cohort.classes))
    mode, splits = plan_splits(cfg, cohort, table.has_split)
    device = resolve_device(cfg.device)
    factory = model_factory or default_model_factory
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "training %s on %d slides (%s), %d fold(s), device %s",
        model_cfg.name,
        len(cohort.slides),
        ", ".join(cohort.classes),
        len(splits),
        device,
    )

    folds: list[FoldOutcome] = []
    predictions: list[list[Any]] = []
    history: list[list[Any]] = []
    best: tuple[float, FoldOutcome] | None = None
    model_config_dict = model_cfg.model_dump(mode="json")
    checkpoint_common: dict[str, Any] = dict(
        model_config=model_config_dict,
        label_map=cohort.label_map,
        feature_dim=cohort.feature_dim,
        encoder=cohort.encoder_attrs,
        train_config=cfg.to_toml_dict(),
    )
    with deterministic_torch(cfg.deterministic, cuda=device.type == "cuda"):
        for split in tqdm(splits, desc="folds", disable=None if progress is None else not progress):
            outcome = _train_fold(cfg, cohort, split, model_cfg, factory, device, progress)
            folds.append(outcome)
            predictions += outputs.prediction_rows(cohort, outcome.val, "val", split.repeat, split.fold)
            if outcome.test is not None:
                predictions += outputs.prediction_rows(cohort, outcome.test, "test", split.repeat, split.fold)
            history += outputs.history_rows(outcome.fit.history, split.repeat, split.fold)
            fold_extra = outcome.checkpoint_extra()
            if cfg.save_fold_checkpoints:
                save_checkpoint(
                    out_dir / "checkpoints" / f"repeat{split.repeat}_fold{split.fold}.pt",
                    outcome.fit.best_state,
                    **checkpoint_common,
                    **fold_extra,
                )
            if best is None or _better(cfg.early_stopping_metric, outcome.fit.best_score, best[0]):
                best = (outcome.fit.best_score, outcome)
                save_checkpoint(
                    out_dir / outputs.CHECKPOINT_FILE, outcome.fit.best_state, **checkpoint_common, **fold_extra
                )

    assert best is not None
    summary = {"val": summarize([f.val_metrics for f in folds])}
    tested = [f.test_metrics for f in folds if f.test_metrics is not None]
    if tested:
        summary["test"] = summarize(tested)
    calibrated = [f.test_calibrated for f in folds if f.test_calibrated is not None]
    if calibrated:
        summary["test_calibrated"] = summarize(calibrated)
    repeats = {f.split.repeat for f in folds}
    summary_repeats = {
        "val": _per_repeat(folds, lambda f: f.val_metrics),
        "test": _per_repeat(folds, lambda f: f.test_metrics),
        "test_calibrated": _per_repeat(folds, lambda f: f.test_calibrated),
    }
    classes = list(cohort.classes)
    files = {
        "metrics": out_dir / outputs.METRICS_FILE,
        "predictions": out_dir / outputs.PREDICTIONS_FILE,
        "history": out_dir / outputs.HISTORY_FILE,
        "label_map": out_dir / outputs.LABEL_MAP_FILE,
        "checkpoint": out_dir / outputs.CHECKPOINT_FILE,
    }
    outputs.write_csv(files["predictions"], outputs.prediction_header(classes), predictions)
    outputs.write_csv(files["history"], outputs.HISTORY_HEADER, history)
    outputs.write_json(files["label_map"], {"label_map": cohort.label_map, "classes": classes})
    outputs.write_json(
        files["metrics"],
        {
            "schema": outputs.METRICS_SCHEMA,
            "config": cfg.to_toml_dict(),
            "model": model_config_dict,
            "label_map": cohort.label_map,
            "classes": classes,
            "feature_dim": cohort.feature_dim,
            "encoder": cohort.encoder_attrs,
            "num_slides": len(cohort.slides),
            "split_mode": mode,
            "folds": [
                {
                    "repeat": f.split.repeat,
                    "fold": f.split.fold,
                    "seed": f.split.seed,
                    "n_train": int(f.split.train.size),
                    "n_val": int(f.split.val.size),
                    "n_test": int(f.split.test.size),
                    "best_epoch": f.fit.best_epoch,
                    "epochs_run": f.fit.epochs_run,
                    "stopped_early": f.fit.stopped_early,
                    "refit": None
                    if f.inner_epochs is None
                    else {"epochs": f.fit.epochs_run, "inner_best_epochs": f.inner_epochs},
                    "val": f.val_metrics,
                    "test": f.test_metrics,
                    "standardized": f.stats is not None,
                    "temperature": f.temperature,
                    "val_calibrated": f.val_calibrated,
                    "test_calibrated": f.test_calibrated,
                }
                for f in folds
            ],
            "summary": summary,
            "summary_repeats": {"repeats": len(repeats), **{k: v for k, v in summary_repeats.items() if v}},
            "best_checkpoint": {
                "repeat": best[1].split.repeat,
                "fold": best[1].split.fold,
                "path": outputs.CHECKPOINT_FILE,
                "monitor": f"val_{cfg.early_stopping_metric}",
                "score": best[0],
            },
        },
    )
    return TrainingReport(
        out_dir=out_dir,
        classes=cohort.classes,
        split_mode=mode,
        folds=folds,
        summary=summary,
        files=files,
        summary_repeats={k: v for k, v in summary_repeats.items() if v},
    )
