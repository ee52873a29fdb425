"""Per-slide predictions of every model of a study: scored from bundles, or read from the sites' own files.

A `PredRow` is one slide scored by one trained model: the evaluation `setting` (in_distribution:
the site's test split, by a model that trained on the site; out_of_site: the held-out site's slides,
by a model that never saw the site), the `model` (`<regime>.<kind>`), the `fold` (the held-out site
of a LOSO run, or `local:<site>` for a site-local model), the evaluation `site`, and the class
probabilities in the study's class order.

Federated predictions are read from `<site>/runs/<run_id>/predictions.csv`, which each site wrote
for itself during the final evaluation; only a study (all sites' folders on one machine) can read
them all. Site-local and centralized models are scored here from their bundles.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedslide.common.atomic import atomic_write
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.data import SlidePair

SETTINGS = ("in_distribution", "out_of_site")
STUDY_PREDICTIONS = "predictions.csv"
SITE_PREDICTIONS = "predictions.csv"


class PredictionsError(ValueError):
    """A predictions file is missing, malformed or does not match the sites' labels."""


@dataclass
class PredRow:
    """One slide scored by one model."""

    setting: str
    model: str
    fold: str
    site: str
    slide_id: str
    patient: str  # "<site>/<patient id>" (the slide's own id when labels.csv has no patient column)
    split: str
    label: int
    probs: np.ndarray  # [C], study class order

    @property
    def key(self) -> tuple[str, str, str]:
        """(fold, site, slide_id): the same slide scored by the same fold's models."""
        return self.fold, self.site, self.slide_id


@dataclass
class PredictionTable:
    """All rows of a study, with the class names their probabilities refer to."""

    classes: tuple[str, ...]
    rows: list[PredRow] = field(default_factory=list)

    def select(self, setting: str | None = None, model: str | None = None, site: str | None = None) -> list[PredRow]:
        """Rows matching every given field."""
        return [
            r
            for r in self.rows
            if (setting is None or r.setting == setting)
            and (model is None or r.model == model)
            and (site is None or r.site == site)
        ]

    def models(self) -> list[str]:
        """Model keys present, in first-seen order."""
        return list(dict.fromkeys(r.model for r in self.rows))

    def sites(self) -> list[str]:
        """Evaluation sites present, in first-seen order."""
        return list(dict.fromkeys(r.site for r in self.rows))

    def write(self, path: Path) -> Path:
        """The study's predictions.csv (one row per slide, model and fold)."""
        with atomic_write(path, newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "setting",
                    "model",
                    "fold",
                    "site",
                    "slide_id",
                    "patient_id",
                    "split",
                    "label",
                    *(f"p_{c}" for c in self.classes),
                ]
            )
            for r in self.rows:
                writer.writerow(
                    [
                        r.setting,
                        r.model,
                        r.fold,
                        r.site,
                        r.slide_id,
                        r.patient,
                        r.split,
                        self.classes[r.label],
                        *(f"{p:.6f}" for p in r.probs),
                    ]
                )
        return path

    @classmethod
    def read(cls, path: Path) -> "PredictionTable":
        """Inverse of `write`."""
        if not path.is_file():
            raise PredictionsError(f"{path} does not exist")
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            classes = tuple(c[2:] for c in columns if c.startswith("p_"))
            if len(classes) < 2:
                raise PredictionsError(f"{path}: no p_<class> columns (found {columns})")
            index = {c: i for i, c in enumerate(classes)}
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    rows.append(
                        PredRow(
                            row["setting"],
                            row["model"],
                            row["fold"],
                            row["site"],
                            row["slide_id"],
                            row["patient_id"],
                            row["split"],
                            index[row["label"]],
                            np.array([float(row[f"p_{c}"]) for c in classes]),
                        )
                    )
                except (KeyError, ValueError) as exc:
                    raise PredictionsError(f"{path} line {line}: {exc!r}") from None
        return cls(classes, rows)


def reorder(probs: np.ndarray, source: Sequence[str], target: Sequence[str], where: str) -> np.ndarray:
    """Columns of `probs` [n, len(source)] in `target` class order (absent classes get probability 0)."""
    unknown = [c for c in source if c not in target]
    if unknown:
        raise PredictionsError(f"{where}: classes {unknown} are not among the study's classes {list(target)}")
    out = np.zeros((probs.shape[0], len(target)), dtype=np.float64)
    for j, name in enumerate(source):
        out[:, list(target).index(name)] = probs[:, j]
    return out


@dataclass
class ScoreCost:
    """Patches and model seconds per slide of the slides a bundle scored (feature files, encoding excluded)."""

    slides: int = 0
    high_patches: int = 0
    low_patches: int = 0
    high_seconds: float = 0.0
    low_seconds: float = 0.0

    def add(self, other: "ScoreCost") -> None:
        for name in ("slides", "high_patches", "low_patches", "high_seconds", "low_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        n = max(self.slides, 1)
        high = {"patches_per_slide": self.high_patches / n, "seconds_per_slide": self.high_seconds / n}
        low = {"patches_per_slide": self.low_patches / n, "seconds_per_slide": self.low_seconds / n}
        ratio = {k: (high[k] / low[k] if low[k] else None) for k in high}
        return {"slides": self.slides, "high": high, "low": low, "high_over_low": ratio}


def score_bundles(
    run_dir: Path,
    slides: Sequence[SlidePair],
    classes: Sequence[str],
    progress: bool = False,
    label: str = "score",
) -> tuple[dict[str, np.ndarray], ScoreCost]:
    """teacher_high / student_low (from `<run>/student`) and baseline_low (`<run>/baseline_low`) probabilities
    [n, C] of `slides`, in `classes` order; plus the high vs low cost of doing so."""
    student = StudentBundle.load(run_dir / "student")
    baseline = StudentBundle.load(run_dir / "baseline_low") if (run_dir / "baseline_low").is_dir() else None
    out: dict[str, list[np.ndarray]] = {"teacher_high": [], "student_low": [], "baseline_low": []}
    cost = ScoreCost()
    for slide in tqdm(slides, desc=label, unit="slide", disable=not progress, leave=False):
        student.check_features(slide.low.attrs)
        low = torch.from_numpy(np.asarray(slide.low.features, dtype=np.float32))
        tokens = None if slide.low.tokens is None else torch.from_numpy(np.asarray(slide.low.tokens, dtype=np.float32))
        low_coords = None if slide.low.coords is None else torch.from_numpy(slide.low.coords)
        high_coords = None if slide.high.coords is None else torch.from_numpy(slide.high.coords)
        t0 = time.perf_counter()
        probs, *_ = student.predict_low(low, tokens, low_coords, low_patch_size_level0=slide.low_size_level0 or None)
        t1 = time.perf_counter()
        out["student_low"].append(probs.numpy())
        if student.teacher is not None:
            high, _ = student.predict_high(
                torch.from_numpy(np.asarray(slide.high.features, dtype=np.float32)), high_coords
            )
            out["teacher_high"].append(high.numpy())
        t2 = time.perf_counter()
        if baseline is not None:
            out["baseline_low"].append(baseline.predict_low(low, None, low_coords)[0].numpy())
        cost.add(ScoreCost(1, len(slide.high), len(slide.low), t2 - t1, t1 - t0))
    names = {
        "teacher_high": student.meta.class_names,
        "student_low": student.meta.class_names,
        "baseline_low": baseline.meta.class_names if baseline is not None else [],
    }
    result = {}
    for kind, values in out.items():
        if values and len(values) == len(slides):
            result[kind] = reorder(np.stack(values).astype(np.float64), names[kind], classes, f"{run_dir}/{kind}")
    return result, cost


def rows_from_scores(
    scores: dict[str, np.ndarray],
    slides: Sequence[SlidePair],
    setting: str,
    regime: str,
    fold: str,
) -> list[PredRow]:
    """PredRows of scored slides (one per slide and model kind)."""
    rows = []
    for kind, probs in scores.items():
        for slide, p in zip(slides, probs):
            rows.append(
                PredRow(
                    setting,
                    f"{regime}.{kind}",
                    fold,
                    slide.site,
                    slide.slide_id,
                    slide.patient_id,
                    slide.split,
                    slide.label,
                    p,
                )
            )
    return rows


def missing_predictions_cause(fed: dict[str, Any], name: str) -> str:
    """Why site `name` wrote no predictions in a federation (`fed`: the run's metrics.json): the first cause on record."""
    sites = {s.get("name"): s for s in fed.get("sites", [])}
    if name not in sites:
        reasons = [str(r.get("reason")) for r in fed.get("refused", []) if r.get("site") in (name, None)]
        return f"site {name} was not admitted to the federation" + (
            f"; refused at the handshake: {' | '.join(reasons)}" if reasons else ""
        )
    node = sites[name].get("node")
    for gap in fed.get("missing", []):
        if node in gap.get("nodes", []):
            reason = gap.get("reasons", {}).get(str(node), "no reply")
            return f"site {name} gave no usable reply in phase {gap.get('phase')} round {gap.get('round')}: {reason}"
    if sites[name].get("role") == "train" and not sites[name].get("n-test"):
        return f"site {name} has no test split, so it scored nothing"
    return f"site {name} did not finish the federation's final evaluation (see its log)"


def read_site_predictions(
    path: Path,
    slides: dict[str, SlidePair],
    fed_classes: Sequence[str],
    classes: Sequence[str],
    setting: str,
    fold: str,
    splits: Iterable[str] | None,
) -> list[PredRow]:
    """Rows of a site's federated `predictions.csv` (teacher_high, student_low, baseline_low columns).

    `slides`: the site's slides by id (labels and patients come from there, and must agree with the
    file); `fed_classes`: the federation's class order (its metrics.json); `splits`: keep only these.
    """
    if not path.is_file():
        raise PredictionsError(f"{path} is missing: the site did not finish the federation's final evaluation")
    keep = None if splits is None else set(splits)
    rows: list[PredRow] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        kinds = [k for k in ("teacher_high", "student_low", "baseline_low") if f"{k}_p0" in columns]
        if not kinds:
            raise PredictionsError(f"{path}: no <model>_p<k> columns (found {columns})")
        for line, row in enumerate(reader, start=2):
            slide = slides.get(row.get("slide_id", ""))
            if slide is None:
                raise PredictionsError(
                    f"{path} line {line}: slide {row.get('slide_id')!r} is not in the site's labels.csv"
                )
            if row.get("label") != classes[slide.label]:
                raise PredictionsError(
                    f"{path} line {line}: slide {slide.slide_id} has label {row.get('label')!r} "
                    f"but labels.csv says {classes[slide.label]!r}"
                )
            if keep is not None and slide.split not in keep:
                continue
            for kind in kinds:
                try:
                    values = np.array([[float(row[f"{kind}_p{k}"]) for k in range(len(fed_classes))]])
                except (KeyError, ValueError) as exc:
                    raise PredictionsError(f"{path} line {line}: {kind}: {exc!r}") from None
                if not np.all(np.isfinite(values)) or math.fsum(values[0]) <= 0:
                    raise PredictionsError(f"{path} line {line}: {kind} probabilities are not finite/positive")
                probs = reorder(values, fed_classes, classes, str(path))[0]
                rows.append(
                    PredRow(
                        setting,
                        f"federated.{kind}",
                        fold,
                        slide.site,
                        slide.slide_id,
                        slide.patient_id,
                        slide.split,
                        slide.label,
                        probs,
                    )
                )
    return rows
