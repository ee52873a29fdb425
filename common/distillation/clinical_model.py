"""The student bundle's optional bidirectional-distillation (BD) model: slide + clinical data, robust when the
clinical row is missing (`common.models.bimodal`).

It reads the student's instances (the adapted 5x instances `StudentBundle.student_instances` builds), so it
deploys with the student. On disk: `clinical.pt` in the bundle directory, a plain dict readable with
`torch.load(weights_only=True)`: `state_dict`, `config` (the `[clinical]` section it was trained with: schema
and model), `stats` (the clinical vectors' normalisation, `FeatureStats.to_payload`), `in_dim`, `num_classes`.
Loading checks them against each other and against the bundle (instance width, class count).

At prediction a slide whose clinical row is complete goes through the multi-modal branch (`multi`), any other
slide through the single-modal branch and its learnable prompt (`single`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError

from fedslide.common.atomic import atomic_path
from fedslide.common.clinical import ClinicalDataError, ClinicalTable, encode, load_clinical, present_mask
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.config.federation import FederationConfig
from fedslide.common.models.bimodal import BidirectionalMIL
from fedslide.common.training.standardize import FeatureStats

CLINICAL_MODEL_FILE = "clinical.pt"
CLINICAL_FORMAT = "fedslide.clinical-model/1"
Branch = Literal["multi", "single"]


class ClinicalSchemaError(ClinicalDataError):
    """A clinical table's columns differ from the schema the bundle's BD model was trained with."""


def federated_bd_config(cfg: FederationConfig) -> ClinicalConfig:
    """A federated run's `[federation.clinical]` as the BD model's config, its epochs the phase's local epochs per
    round (rounds.clinical-local-epochs): what the sites train with and what the saved model records."""
    clinical = ClinicalConfig.model_validate(cfg.clinical.to_toml_dict())
    return clinical.model_copy(update={"epochs": cfg.rounds.clinical_local_epochs})


def build_bd(in_dim: int, cfg: ClinicalConfig, num_classes: int) -> BidirectionalMIL:
    """A fresh BD model of the `[clinical]` config's architecture."""
    return BidirectionalMIL(
        in_dim,
        cfg.encoded_dim,
        num_classes,
        cfg.hidden_dim,
        cfg.attention_dim,
        cfg.dropout,
        shared_slide_encoder=cfg.shared_slide_encoder,
    )


def schema_columns(cfg: ClinicalConfig) -> list[str]:
    """The schema's column names, in order."""
    return [v.name for v in cfg.variables]


@dataclass
class ClinicalModel:
    """A trained BD model with the schema and the normalisation its clinical input needs."""

    model: BidirectionalMIL
    cfg: ClinicalConfig
    stats: FeatureStats
    in_dim: int
    num_classes: int

    def save(self, path: Path) -> None:
        """Write the model file (`clinical.pt`) atomically."""
        payload = {
            "format": CLINICAL_FORMAT,
            "config": self.cfg.to_toml_dict(),
            "stats": self.stats.to_payload(),
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
        }
        with atomic_path(Path(path)) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: Path, map_location: str | torch.device = "cpu") -> ClinicalModel:
        """Read a model file; ValueError naming the file and the part that is off."""
        path = Path(path)
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CLINICAL_FORMAT:
            raise ValueError(f"{path} is not a fedslide BD model file ({CLINICAL_FORMAT})")
        try:
            cfg = ClinicalConfig.model_validate(payload["config"])
        except ValidationError as exc:
            raise ValueError(f"{path}: its clinical schema/config is invalid: {exc}") from None
        stats = FeatureStats.from_payload(payload.get("stats"))
        if stats is None or stats.mean.shape != (cfg.encoded_dim,):
            shape = None if stats is None else tuple(stats.mean.shape)
            raise ValueError(
                f"{path}: normalisation statistics of shape {shape}; its schema encodes {cfg.encoded_dim} values"
            )
        in_dim, num_classes = int(payload["in_dim"]), int(payload["num_classes"])
        model = build_bd(in_dim, cfg, num_classes)
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise ValueError(f"{path}: the weights do not fit the BD model its config describes: {exc}") from None
        return cls(model.eval(), cfg, stats, in_dim, num_classes)

    def check_bundle(self, path: Path, instance_dim: int, num_classes: int) -> None:
        """Refuse a model whose input width or class count differs from the bundle's student."""
        if self.in_dim != instance_dim or self.num_classes != num_classes:
            raise ValueError(
                f"{path}: BD model reads {self.in_dim}-d instances with {self.num_classes} classes, but the bundle's "
                f"student reads {instance_dim}-d instances with {num_classes} classes"
            )

    def read_table(self, path: Path, row_errors: dict[str, str] | None = None) -> ClinicalTable:
        """`path` read against the schema the model was trained with; ClinicalSchemaError naming both column lists
        when the columns differ, ClinicalDataError naming file/row/column/value/allowed for a bad cell (with
        `row_errors`: that row is left out and its message kept there, see `load_clinical`)."""
        path = Path(path)
        with path.open(newline="") as handle:
            header = [name.strip() for name in next(csv.reader(handle), [])]
        ours = schema_columns(self.cfg)
        if sorted(header[1:]) != sorted(ours):
            raise ClinicalSchemaError(
                f"{path}: columns {header[1:]} differ from the schema the bundle's BD model was trained with: {ours} "
                f"(unknown: {sorted(set(header[1:]) - set(ours)) or 'none'}; "
                f"missing: {sorted(set(ours) - set(header[1:])) or 'none'})"
            )
        return load_clinical(path, self.cfg, row_errors)

    @torch.inference_mode()
    def predict(self, instances: torch.Tensor, raw: np.ndarray | None) -> tuple[torch.Tensor, Branch]:
        """Class probabilities [C] of one slide's student instances [M, E] and the branch that read it: `multi`
        when `raw` (the slide's raw clinical vector, NaN = not recorded) is complete, else `single`."""
        dim = self.cfg.encoded_dim
        row = np.full((1, dim), np.nan) if raw is None else np.asarray(raw, dtype=np.float64).reshape(1, dim)
        z, present = encode(row, self.stats)
        x = torch.as_tensor(instances, dtype=torch.float32)[None]
        out = self.model(x, None, torch.from_numpy(z), torch.from_numpy(present))
        return torch.softmax(out.logits, dim=-1)[0].float(), "multi" if bool(present[0]) else "single"


def with_clinical(raw: np.ndarray) -> int:
    """How many of the rows hold a complete clinical vector."""
    return int(present_mask(raw).sum())


def model_payload_summary(model: ClinicalModel) -> dict[str, Any]:
    """What metrics.json and messages say about a BD model: its schema columns and input width."""
    return {"columns": schema_columns(model.cfg), "encoded_dim": model.cfg.encoded_dim, "in_dim": model.in_dim}
