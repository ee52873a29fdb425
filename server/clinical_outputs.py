"""The federated bidirectional-distillation (BD) model in the coordinator's run outputs (`[federation.clinical]`):
`models/clinical.pt` (the bundle's `clinical.pt` format, `common.distillation.clinical_model`: weights, schema and
the pooled clinical normalisation, so `ClinicalModel.load` reads it) with its manifest entry, and the sites' BD
evaluation metrics (`bd_clinical`: clinical rows as recorded; `bd_no_clinical`: every row removed) as model rows
of metrics.json."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedslide.common.config.federation import FederationConfig
from fedslide.common.distillation.clinical_model import (
    CLINICAL_MODEL_FILE,
    ClinicalModel,
    build_bd,
    federated_bd_config,
)
from fedslide.common.federation import phases as ph
from fedslide.common.federation.clinical_phase import load_bd_record
from fedslide.common.federation.feature_stats import stats_from_record
from fedslide.common.federation.models import student_config
from fedslide.common.federation.protocol import Facts


def bd_model(cfg: FederationConfig, facts: Facts, record: ArrayRecord, norm: ArrayRecord) -> ClinicalModel:
    """The final BD model of a run from its arrays and the pooled clinical normalisation (the BD model reads the
    student's instances: `student_config(...).in_dim` wide)."""
    clinical = federated_bd_config(cfg)
    in_dim, classes = int(student_config(cfg, facts).in_dim), len(facts.classes)
    model = build_bd(in_dim, clinical, classes)
    load_bd_record(model, record)
    return ClinicalModel(model.eval(), clinical, stats_from_record(norm, clinical.encoded_dim), in_dim, classes)


def save_bd_model(
    run_dir: Path, cfg: FederationConfig, facts: Facts, record: ArrayRecord | None, norm: ArrayRecord | None
) -> dict[str, dict[str, Any]]:
    """Write `models/clinical.pt` when the run trained a BD model; its manifest entry (none otherwise)."""
    if record is None or norm is None:
        return {}
    path = Path(run_dir) / "models" / CLINICAL_MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    bd_model(cfg, facts, record, norm).save(path)
    return {
        ph.BD_MODEL: {
            "file": f"models/{CLINICAL_MODEL_FILE}",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "parameters": int(sum(int(np.prod(v.shape)) for v in record.values())),
            "serialized_bytes": int(sum(len(v.data) for v in record.values())),
        }
    }


def has_bd_rows(per_site: dict[str, dict[str, float]]) -> bool:
    """Whether any site reported BD evaluation metrics."""
    return any(ph.BD_WITH_CLINICAL in values for values in per_site.values())


def with_clinical(per_site: dict[str, dict[str, float]]) -> dict[str, int]:
    """Per site: its evaluated slides with a complete clinical row (those `bd_clinical` read multi-modally)."""
    return {site: int(v[ph.BD_WITH_CLINICAL]) for site, v in per_site.items() if ph.BD_WITH_CLINICAL in v}
