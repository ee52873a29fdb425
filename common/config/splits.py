"""How a site's test and validation splits are carved when its labels.csv has no split column (shared by every stage)."""

from __future__ import annotations

from pydantic import Field

from fedslide.common.config.base import StageConfig


class SplitCarving(StageConfig):
    """Fractions and seed of the stratified, patient-grouped test/validation split carved for labels without a
    split column (written to `<site>/splits.csv` and reused from there by every later run)."""

    test_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="share of a site's slides (whole patients) held out as its test split; 0 = no test split "
        "(test metrics are then empty)",
    )
    val_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="share of the remaining slides (whole patients) held out for validation (model selection)",
    )
    seed: int = Field(default=0, description="seed of the carving (independent of the training seed)")
