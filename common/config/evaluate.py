"""Config of `fedslide evaluate`: the leave-one-site-out study (TOML section [evaluate]).

The study trains, for every site h, a federation without h (h joins evaluation-only), a
centralized (pooled) model without h and, once per site, a site-local model; it scores them all
on every site and writes `<out-dir>/metrics.json` (schema `fedslide.evaluation.metrics/1`).
The federation and distillation settings are the [federation] and [distill] ones, nested here as
[evaluate.federation] and [evaluate.distill]; the study itself sets the run ids, run folders,
evaluation-only sites and training sites, so those keys are refused there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from fedslide.common.config.base import StageConfig
from fedslide.common.config.distill import DistillConfig
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.splits import SplitCarving

Regime = Literal["local", "federated", "centralized"]
REGIMES: tuple[Regime, ...] = ("local", "federated", "centralized")
MODEL_KINDS: tuple[str, ...] = ("teacher_high", "student_low", "baseline_low")
_MODEL_KEY = re.compile(r"^(local|federated|centralized)\.(teacher_high|student_low|baseline_low)$")
_SET_BY_STUDY = {
    "federation": ("run_id", "runs_dir", "resume", "eval_only_sites", "carve"),
    "distill": ("sites", "out_dir", "carve"),
}


class HeatmapSettings(StageConfig):
    """Attention heatmaps of the low-res student over example slides of every site."""

    enabled: bool = Field(default=True, description="render heatmaps of example slides")
    per_class: NonNegativeInt = Field(default=1, description="example slides per class and site")
    source: Literal["site", "centralized", "both"] = Field(
        default="both",
        description="'site': each site renders the federated student of its own LOSO fold into its own run folder "
        "(<site>/runs/<run-id>/heatmaps/; heatmaps never leave a site in a federation); 'centralized': the "
        "centralized reference of that fold, in <out-dir>/heatmaps/; 'both'",
    )
    size: PositiveInt = Field(default=480, ge=64, le=4096, description="long side of the slide thumbnail, px")


class EvaluateConfig(StageConfig):
    """`fedslide evaluate` (TOML section [evaluate])."""

    dump_omit = _SET_BY_STUDY  # the study sets these itself: configs/defaults.toml leaves them out

    sites: list[Path] = Field(default_factory=list, description="site directories (labels.csv + features/<encoder>/)")
    out_dir: Path | None = Field(default=None, description="study folder: metrics.json, predictions.csv, runs, report")
    study_id: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="prefix of the federation run ids <study-id>-loso-<site> (default: the out-dir's name)",
    )
    encoder: str | None = Field(
        default=None, description="features/<encoder> subfolder (default: the only one present)"
    )
    regimes: list[Regime] = Field(
        default_factory=lambda: list(REGIMES),
        min_length=1,
        description="what is trained and compared: local (each site alone), federated (LOSO federations), "
        "centralized (pooled LOSO reference, the upper bound)",
    )
    held_out_split: Literal["all", "test"] = Field(
        default="all",
        description="slides of the held-out site that are scored: every labelled slide, or its test split",
    )
    seed: int = Field(
        default=0, description="seed of the bootstrap and the example choice (training seeds: federation/distill)"
    )
    bootstrap: PositiveInt = Field(default=1000, description="bootstrap resamples of every confidence interval")
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5, description="1 - alpha confidence intervals (0.05: 95 %)")
    paired_test: Literal["auto", "delong", "bootstrap"] = Field(
        default="auto",
        description="paired AUC test: 'auto' = DeLong on independent slides (binary), paired patient bootstrap "
        "where slides share a patient or a slide is scored by several fold models; 'delong' falls back to the "
        "bootstrap there",
    )
    paired_tests: list[str] = Field(
        default_factory=lambda: [
            "federated.student_low:federated.teacher_high",
            "federated.student_low:centralized.student_low",
            "centralized.student_low:centralized.teacher_high",
        ],
        description="model pairs A:B whose AUCs are compared on the same slides (diff = A - B); "
        "models are <regime>.<teacher_high|student_low|baseline_low>",
    )
    ece_bins: PositiveInt = Field(default=15, description="equal-width confidence bins of the ECE")
    reuse: bool = Field(default=True, description="reuse finished fold runs found in out-dir (resume a study)")
    report: bool = Field(default=True, description="write report.md and report.html when the study is done")
    cost_slides: NonNegativeInt = Field(
        default=2,
        description="held-out slides with slide files timed end to end (fedslide predict from the file, encoding "
        "included) at high and low resolution for the report's cost section (0: not measured)",
    )
    threads: PositiveInt | None = Field(default=None, description="torch CPU threads (default: torch's choice)")
    progress: bool = Field(default=True, description="show progress bars")
    federation: FederationConfig = Field(
        default_factory=FederationConfig, description="the LOSO federations ([federation] keys)"
    )
    distill: DistillConfig = Field(
        default_factory=DistillConfig, description="site-local and centralized models ([distill] keys)"
    )
    heatmaps: HeatmapSettings = Field(default_factory=HeatmapSettings)
    carve: SplitCarving = Field(
        default_factory=SplitCarving,
        description="test/validation splits carved for a site whose labels.csv has no split column (every regime "
        "uses the same: [evaluate.carve], not [evaluate.federation.carve] or [evaluate.distill.carve])",
    )

    @field_validator("regimes")
    @classmethod
    def _unique_regimes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"regimes must not repeat, got {value}")
        return value

    @field_validator("paired_tests")
    @classmethod
    def _pairs(cls, value: list[str]) -> list[str]:
        for pair in value:
            parts = pair.split(":")
            if len(parts) != 2 or not all(_MODEL_KEY.match(p) for p in parts) or parts[0] == parts[1]:
                raise ValueError(
                    f"paired test {pair!r} is not 'A:B' with two different models A, B of the form "
                    f"<local|federated|centralized>.<{'|'.join(MODEL_KINDS)}>"
                )
        return value

    @model_validator(mode="after")
    def _study_owned_keys(self) -> "EvaluateConfig":
        for section, keys in _SET_BY_STUDY.items():
            nested = getattr(self, section)
            for key in keys:
                if key in nested.model_fields_set:
                    raise ValueError(
                        f"{section}.{key.replace('_', '-')} is set by the study itself (one run per fold); "
                        f"remove it from [evaluate.{section}]"
                    )
        return self

    def model_keys(self) -> list[str]:
        """`<regime>.<kind>` of every model the study scores."""
        return [f"{r}.{k}" for r in REGIMES if r in self.regimes for k in MODEL_KINDS]
