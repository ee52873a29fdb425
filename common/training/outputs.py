"""Files a training run writes: metrics.json, predictions.csv, history.csv, label_map.json.

metrics.json (schema `fedslide.train.metrics/1`)::

    {"schema", "config" (the resolved TrainConfig, kebab-case), "model" (the resolved ModelConfig),
     "label_map" {class name: index}, "classes" [names by index], "feature_dim", "encoder" {attrs},
     "num_slides", "split_mode" ("cv" | "given" | "carved"),
     "folds": [{"repeat", "fold", "seed", "n_train", "n_val", "n_test", "best_epoch", "epochs_run",
                "stopped_early", "refit": {"epochs", "inner_best_epochs"} | null,
                "val": {metric: value}, "test": {metric: value} | null,
                "standardized", "temperature" | null, "val_calibrated" | null, "test_calibrated" | null}],
     "summary": {"val" | "test" | "test_calibrated": {metric: {"mean", "sd", "n"}}}  (over all folds),
     "summary_repeats": {"repeats", "val" | "test" | "test_calibrated": {metric: {"mean", "sd", "n"}}}
                        (mean and sd over repeats of each repeat's mean over its folds),
     "best_checkpoint": {"repeat", "fold", "path", "monitor", "score"}}

"*_calibrated" are the metrics after temperature scaling (calibration = "temperature"), with "loss"
the unweighted log-loss; the checkpoint stores the temperature and the standardisation statistics.
With refit, a fold's "val" (and its val rows in predictions.csv) are the inner folds' held-out predictions,
each at its inner fold's selected epoch; the model was then retrained on train + val for "refit.epochs".

Undefined values (NaN) are written as null. predictions.csv has one row per slide of each fold's
val and test splits: fold, repeat, split, slide_id, label, prob_<class> for each class, predicted.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedslide.common.atomic import atomic_write, write_text_atomic
from fedslide.common.training.cohort import Cohort
from fedslide.common.training.loop import EpochRecord, EvalResult

METRICS_SCHEMA = "fedslide.train.metrics/1"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
HISTORY_FILE = "history.csv"
LABEL_MAP_FILE = "label_map.json"
CHECKPOINT_FILE = "model.pt"


def json_safe(value: Any) -> Any:
    """Replace NaN/Inf floats by None, recursively, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write standard JSON atomically."""
    write_text_atomic(path, json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")


def prediction_header(classes: Sequence[str]) -> list[str]:
    """Columns of predictions.csv."""
    return ["fold", "repeat", "split", "slide_id", "label", *[f"prob_{c}" for c in classes], "predicted"]


def prediction_rows(cohort: Cohort, result: EvalResult, split: str, repeat: int, fold: int) -> list[list[str | int]]:
    """One predictions.csv row per slide of `result`."""
    rows: list[list[str | int]] = []
    for index, label, probs in zip(result.indices, result.labels, result.probs):
        rows.append(
            [
                fold,
                repeat,
                split,
                cohort.slides[int(index)].slide_id,
                cohort.classes[int(label)],
                *[f"{p:.6f}" for p in probs],
                cohort.classes[int(probs.argmax())],
            ]
        )
    return rows


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV atomically."""
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def history_rows(history: Sequence[EpochRecord], repeat: int, fold: int) -> list[list[Any]]:
    """history.csv rows of one fold."""
    return [
        [
            repeat,
            fold,
            r.epoch,
            f"{r.train_loss:.6f}",
            f"{r.val_loss:.6f}",
            f"{r.val_auc:.6f}",
            f"{r.lr:.6g}",
            f"{r.seconds:.3f}",
        ]
        for r in history
    ]


HISTORY_HEADER = ["repeat", "fold", "epoch", "train_loss", "val_loss", "val_auc", "lr", "seconds"]
