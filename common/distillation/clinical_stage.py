"""`fedslide distill` with `[clinical] enabled = true`: the bidirectional-distillation (BD) model trained on the
student's 5x instances and the sites' clinical tables, shipped in the student bundle.

Sites with `clinical.csv` contribute clinical vectors (a patient-keyed table serves every slide of the patient);
slides of sites without one, and slides without a complete row, train the single-modal branch and the prompt
only. The clinical normalisation is fitted on the training slides' vectors. Test metrics are reported twice:
with the test slides' clinical data as recorded, and with all of it removed (every slide read by the
single-modal branch).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedslide.common.clinical import load_site_clinical, pooled_clinical_stats, site_clinical_sums
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.distillation.clinical_model import (
    ClinicalModel,
    build_bd,
    model_payload_summary,
    with_clinical,
)
from fedslide.common.distillation.data import DistillData
from fedslide.common.metrics import classification_metrics
from fedslide.common.models.bimodal import BidirectionalMIL
from fedslide.common.training.bd_fit import Selection, TrainSettings, bd_auc, bd_batch_loss, fit, pad
from fedslide.common.training.cohort import Cohort
from fedslide.common.training.errors import TrainingInputError
from fedslide.common.training.standardize import FeatureStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationSlides:
    """The slides that select the BD model's epoch: student-instance bags, labels and raw clinical rows (NaN rows:
    none recorded)."""

    bags: Sequence[np.ndarray]
    labels: np.ndarray
    raw: np.ndarray


def cohort_clinical(data: DistillData, site_dirs: Sequence[Path], cfg: ClinicalConfig) -> np.ndarray:
    """Raw clinical vectors [n_slides, encoded_dim] of every slide of `data` (NaN rows: none recorded), read from
    each site's clinical.csv against the schema of `cfg`; ClinicalDataError names the file, row and column."""
    out = np.full((len(data.slides), cfg.encoded_dim), np.nan)
    dirs = dict(zip(data.sites, site_dirs))
    for site, site_dir in dirs.items():
        table = load_site_clinical(Path(site_dir), cfg)
        if table is None:
            continue
        rows = [i for i, s in enumerate(data.slides) if s.site == site]
        ids = [data.slides[i].slide_id for i in rows]
        patient_of = {data.slides[i].slide_id: data.slides[i].patient_id.removeprefix(f"{site}/") for i in rows}
        out[rows] = table.lookup(ids, patient_of)
    return out


def check_training_rows(raw: np.ndarray, train_idx: np.ndarray, site_dirs: Sequence[Path]) -> None:
    """TrainingInputError (before anything trains) when no training slide has a complete clinical row."""
    if with_clinical(raw[train_idx]) == 0:
        raise TrainingInputError(
            f"[clinical] enabled = true, but none of the {len(train_idx)} training slides has a complete row in a "
            f"site's clinical.csv (sites: {', '.join(str(d) for d in site_dirs)}); add the tables or set "
            "clinical.enabled = false"
        )


def train_bd(
    model: BidirectionalMIL,
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    raw: np.ndarray,
    stats: FeatureStats,
    cfg: ClinicalConfig,
    seed: int,
    val: ValidationSlides | None = None,
) -> Selection:
    """Train `model` in place (AdamW, `cfg.epochs` epochs of shuffled mini-batches, the BD loss of
    `common.models.bimodal.bd_losses`; `common.training.bd_fit.fit`); bags are padded per batch only, so a cohort
    never sits in one tensor. With `val`, the model is scored after every epoch by its validation AUC read as at
    inference (`bd_auc`: multi-modal branch where a slide's clinical row is complete) and restored to the best
    epoch (first of ties; the bench's centralised selection, tests/bench/clinical_bd.md)."""
    y = torch.as_tensor(labels, dtype=torch.long)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        x, mask = pad([bags[i] for i in idx])
        return bd_batch_loss(model, x, mask, y[idx], raw[idx], stats, cfg)

    def val_auc(trained: nn.Module) -> float:
        assert val is not None and isinstance(trained, BidirectionalMIL)
        return bd_auc(trained, val.bags, val.labels, val.raw, stats, cfg.batch_size)

    return fit(model, len(bags), batch_loss, TrainSettings.of(cfg), seed, score=None if val is None else val_auc)


def _selection_info(selection: Selection, val: ValidationSlides | None, epochs: int) -> dict[str, Any]:
    """What metrics.json says about the epoch selection: the selected epoch (from 1) and its validation AUC."""
    if val is None:
        return {"selection": "none (no validation slides)", "epoch": epochs}
    if selection.best < 0:
        log.warning("BD model: no epoch could be scored on the %d validation slides (one class?)", len(val.bags))
        return {"selection": "none (validation AUC undefined)", "epoch": epochs, "val_slides": len(val.bags)}
    return {
        "selection": "validation auc",
        "epoch": selection.best + 1,
        "val_auc": selection.history[selection.best],
        "val_slides": len(val.bags),
        "val_with_clinical": with_clinical(val.raw),
    }


def bd_metrics(model: ClinicalModel, bags: Sequence[np.ndarray], labels: np.ndarray, raw: np.ndarray) -> dict[str, Any]:
    """Test metrics of the BD model read slide by slide as prediction reads it, and how many slides had clinical
    data."""
    probs = np.stack([model.predict(torch.from_numpy(bag), row)[0].double().numpy() for bag, row in zip(bags, raw)])
    return {**classification_metrics(labels, probs), "with_clinical": with_clinical(raw)}


def clinical_stage(
    data: DistillData,
    site_dirs: Sequence[Path],
    raw: np.ndarray,
    cohort: Cohort,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    cfg: ClinicalConfig,
    seed: int,
    val_idx: np.ndarray | None = None,
) -> tuple[ClinicalModel, dict[str, Any]]:
    """Train the BD model on the training slides' instances of `cohort` (the student's input) with the slides' raw
    clinical vectors `raw` (`cohort_clinical`; normalisation fitted on the training slides') and report its test
    metrics with the test slides' clinical data as recorded and with it removed. With validation slides `val_idx`
    (the distill run's val split) the epoch is selected on their AUC read as at inference (`train_bd`); without
    them, or when no epoch scores (one class only), the last epoch's model is kept."""
    check_training_rows(raw, train_idx, site_dirs)
    labels = data.labels
    stats = pooled_clinical_stats([site_clinical_sums(raw[train_idx])])
    torch.manual_seed(seed)
    num_classes = len(data.classes)
    model = build_bd(cohort.feature_dim, cfg, num_classes)
    val = None
    if val_idx is not None and len(val_idx):
        val = ValidationSlides([cohort.load(int(i))[0] for i in val_idx], labels[val_idx], raw[val_idx])
    train_bags = [cohort.load(int(i))[0] for i in train_idx]
    selection = train_bd(model, train_bags, labels[train_idx], raw[train_idx], stats, cfg, seed, val)
    trained = ClinicalModel(model, cfg, stats, cohort.feature_dim, num_classes)
    info: dict[str, Any] = {
        "used": True,
        **model_payload_summary(trained),
        "train_slides": len(train_idx),
        "train_with_clinical": with_clinical(raw[train_idx]),
        "sites_with_table": [s for s, d in zip(data.sites, site_dirs) if (Path(d) / "clinical.csv").is_file()],
        **_selection_info(selection, val, cfg.epochs),
    }
    if len(test_idx):
        bags = [cohort.load(int(i))[0] for i in test_idx]
        info["test"] = bd_metrics(trained, bags, labels[test_idx], raw[test_idx])
        info["test_without_clinical"] = bd_metrics(trained, bags, labels[test_idx], np.full_like(raw[test_idx], np.nan))
        log.info(
            "BD model test auc %.3f with the clinical data recorded (%d of %d slides), %.3f without",
            info["test"]["auc"],
            info["test"]["with_clinical"],
            len(test_idx),
            info["test_without_clinical"]["auc"],
        )
    return trained, info
