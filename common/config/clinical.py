"""Config of a site's clinical table (`clinical.csv`) and of bidirectional distillation (section [clinical]).

The schema lists the table's typed columns: numeric ones with a unit and an allowed range, categorical ones with
their allowed values. `fedslide.common.clinical` reads and encodes a table against it; the defaults describe the
table `fedslide synth` writes (`client/synth/clinical.py`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from fedslide.common.config.base import StageConfig

_COLUMN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
RESERVED_COLUMNS = ("slide_id", "patient_id")


class NumericVariable(StageConfig):
    """A numeric column: its unit and the closed range a recorded value must lie in."""

    kind: Literal["numeric"] = "numeric"
    name: str = Field(description="column name in clinical.csv")
    unit: str = Field(description="unit the values are recorded in (e.g. years, mm)")
    min: float = Field(description="smallest allowed value")
    max: float = Field(description="largest allowed value")

    @model_validator(mode="after")
    def _range(self) -> "NumericVariable":
        if not self.min <= self.max:
            raise ValueError(f"column {self.name!r}: min {self.min} is larger than max {self.max}")
        return self


class CategoricalVariable(StageConfig):
    """A categorical column and its allowed values (one-hot encoded in that order)."""

    kind: Literal["categorical"] = "categorical"
    name: str = Field(description="column name in clinical.csv")
    values: list[str] = Field(min_length=2, description="allowed values, in encoding order")

    @field_validator("values")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"allowed values must be unique, got {value}")
        return value


ClinicalVariable = Annotated[NumericVariable | CategoricalVariable, Field(discriminator="kind")]


def default_variables() -> list[NumericVariable | CategoricalVariable]:
    """The columns `fedslide synth` writes."""
    return [
        NumericVariable(name="age", unit="years", min=18.0, max=100.0),
        NumericVariable(name="tumour_size", unit="mm", min=0.0, max=200.0),
        CategoricalVariable(name="grade", values=["1", "2", "3"]),
        CategoricalVariable(name="er_status", values=["negative", "positive"]),
    ]


class ClinicalConfig(StageConfig):
    """The clinical table's schema and the bidirectional-distillation (BD) model trained on slides + clinical data."""

    variables: list[ClinicalVariable] = Field(
        default_factory=default_variables, min_length=1, description="typed columns of clinical.csv"
    )
    missing_tokens: list[str] = Field(
        default=["", "NA", "NaN", "unknown"], description="cell values that mean 'not recorded' (case-insensitive)"
    )
    hidden_dim: PositiveInt = Field(default=64, description="width of the slide and clinical embeddings")
    attention_dim: PositiveInt = Field(default=32, description="width of the ABMIL attention")
    dropout: float = Field(default=0.25, ge=0.0, lt=1.0, description="dropout in the slide and clinical encoders")
    temperature: float = Field(default=2.0, gt=0.0, le=20.0, description="distillation temperature T (T² scaling)")
    weight_m2s: float = Field(default=1.0, ge=0.0, description="weight of multi-modal → single-modal distillation")
    weight_s2m: float = Field(
        default=0.1,
        ge=0.0,
        description="weight of single-modal → multi-modal distillation (tests/bench/clinical_bd.md)",
    )
    shared_slide_encoder: bool = Field(
        default=True,
        description="both BD branches read one ABMIL slide embedding (trained by every slide) instead of one each",
    )
    enabled: bool = Field(
        default=False,
        description="train a BD model on the student's 5x instances of the sites with clinical.csv and ship it in "
        "the student bundle (fedslide distill; fedslide predict --clinical reads it)",
    )
    epochs: PositiveInt = Field(default=30, description="epochs of the BD model's training (fedslide distill)")
    batch_size: PositiveInt = Field(default=16, description="slides per BD training batch")
    lr: PositiveFloat = Field(default=1e-3, description="AdamW learning rate of the BD model")
    weight_decay: float = Field(default=1e-4, ge=0.0, description="AdamW weight decay of the BD model")

    @field_validator("variables")
    @classmethod
    def _names(cls, value: list[NumericVariable | CategoricalVariable]) -> list[NumericVariable | CategoricalVariable]:
        names = [v.name for v in value]
        bad = [n for n in names if not _COLUMN.match(n) or n in RESERVED_COLUMNS]
        if bad:
            raise ValueError(
                f"column names must start with a letter, hold letters, digits, '-' or '_', and not be "
                f"{' or '.join(RESERVED_COLUMNS)}: {bad}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"column names must be unique, got {names}")
        return value

    @property
    def encoded_dim(self) -> int:
        """Length of the encoded clinical vector: one per numeric column, one per categorical value."""
        return sum(1 if isinstance(v, NumericVariable) else len(v.values) for v in self.variables)
