"""The LOSO study's clinical-missingness column: the held-out site's BD AUC with 0 / 50 / 80 / 100 % of its
clinical rows removed (issue 34).

It reads the held-out site's copy of its fold's bundle (`clinical.pt`, trained federated with
`[federation.clinical] enabled = true`) and the site's own `clinical.csv`; a fold whose bundle has no BD model, or a
site without a table, has no column. Rows are removed from the slides that have a complete row, in one seeded order,
so each level removes a superset of the previous level's rows. The BD model reads the 5x features of the fold's
bundle (`bundle_features.matching_slide`: a fine-tuned encoder's own folder); a slide without them is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslide.client.inference.clinical import read_patients
from fedslide.common.clinical import CLINICAL_FILE, present_mask
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.data import SlidePair
from fedslide.common.metrics import classification_metrics
from fedslide.deploy.study.bundle_features import matching_slide

MISSINGNESS = (0.0, 0.5, 0.8, 1.0)


def clinical_missingness(
    bundle_dir: Path,
    site_dir: Path,
    slides: Sequence[SlidePair],
    seed: int = 0,
    levels: Sequence[float] = MISSINGNESS,
    classes: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """{"n", "with_clinical", "auc": {"<percent>": AUC or None}} of the bundle's BD model on `slides` of the site
    at each missingness level; None when the bundle has no BD model or the site no clinical.csv. `classes` names
    the slides' label indices (their `DistillData.classes`); they are mapped to the bundle's class order by name
    (by default the slides already use the bundle's order)."""
    table_path = Path(site_dir) / CLINICAL_FILE
    if not slides or not table_path.is_file():
        return None
    bundle = StudentBundle.load(bundle_dir)
    if bundle.clinical is None:
        return None
    model = bundle.clinical
    table = model.read_table(table_path)
    patient_of = read_patients(Path(site_dir) / "labels.csv") if table.key == "patient_id" else None
    raw = table.lookup([s.slide_id for s in slides], patient_of)
    present = np.flatnonzero(present_mask(raw))
    order = np.random.default_rng(seed).permutation(present)
    instances = []
    for slide in slides:
        low = matching_slide(bundle, slide, Path(site_dir)).low  # a fine-tuned 5x encoder: that fold's own files
        tokens = None if low.tokens is None or not bundle.uses_tokens else torch.from_numpy(low.tokens)
        instances.append(bundle.student_instances(torch.from_numpy(low.features), tokens)[0])
    labels = _bundle_labels(slides, classes, bundle.meta.class_names, Path(bundle_dir))
    auc: dict[str, float | None] = {}
    for level in levels:
        rows = raw.copy()
        rows[order[: int(round(level * len(present)))]] = np.nan
        probs = np.stack([model.predict(x, row)[0].double().numpy() for x, row in zip(instances, rows)])
        value = classification_metrics(labels, probs).get("auc")
        auc[f"{round(level * 100)}"] = None if value is None or not np.isfinite(value) else float(value)
    return {"n": len(slides), "with_clinical": int(len(present)), "auc": auc}


def _bundle_labels(
    slides: Sequence[SlidePair], classes: Sequence[str] | None, bundle_classes: Sequence[str], bundle_dir: Path
) -> np.ndarray:
    """The slides' labels as indices of the bundle's classes (`classes`: the names of the slides' indices)."""
    if classes is None:
        return np.array([s.label for s in slides])
    order = {str(name): k for k, name in enumerate(bundle_classes)}
    unknown = sorted({str(classes[s.label]) for s in slides} - set(order))
    if unknown:
        raise ValueError(
            f"{bundle_dir}: the BD model's classes {list(bundle_classes)} lack the slides' class(es) {unknown}"
        )
    return np.array([order[str(classes[s.label])] for s in slides])
