"""Config of `fedslide synth`: a synthetic multi-site cohort of pyramidal H&E-like slides (section [synth])."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, field_validator, model_validator

from fedslide.common.config.base import StageConfig

ScannerStyleName = Literal["aperio-40x", "aperio-20x", "generic-40x", "generic-20x", "plain-20x"]
SCANNER_STYLE_NAMES: tuple[str, ...] = ("aperio-40x", "aperio-20x", "generic-40x", "generic-20x", "plain-20x")

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class SynthConfig(StageConfig):
    """N sites × K slides: labels, splits, stain shifts, artefacts and how the files are written."""

    out_dir: Path = Field(examples=["cohort"], description="cohort root; each site is written to <out-dir>/<site>/")
    sites: int = Field(default=3, ge=1, le=100, description="number of sites (hospitals)")
    slides_per_site: int = Field(
        default=6, ge=2, le=10_000, description="slides per site, in equal shares per class (the remainder normal)"
    )
    task: Literal["binary", "subtyping"] = Field(
        default="binary",
        description="binary: normal / tumor; subtyping: normal / benign / carcinoma, each lesion class with its own "
        "20x nuclear cue and a weaker 5x stain cue",
    )
    seed: NonNegativeInt = Field(default=0, description="everything generated is a pure function of this seed")
    site_names: list[str] | None = Field(
        default=None, description="one name per site (default site1..siteN); letters, digits, '-' and '_'"
    )
    scanner_styles: list[ScannerStyleName] = Field(
        default=["aperio-40x", "generic-20x"],
        min_length=1,
        description="scanner style per site, cycled: aperio-40x (.svs, 0.25 µm/px), generic-20x (.tif, 0.5 µm/px), "
        "aperio-20x, generic-40x, plain-20x (.tif without resolution metadata)",
    )
    slide_size_um: tuple[PositiveFloat, PositiveFloat] = Field(
        default=(2000.0, 2800.0), description="range of the scanned area's width and height, µm (each drawn uniformly)"
    )
    tumor_area_fraction: tuple[float, float] = Field(
        default=(0.1, 0.4), description="range of the share of the tissue that is lesion, on tumor (lesion) slides"
    )
    pen_mark_fraction: float = Field(default=0.3, ge=0.0, le=1.0, description="share of slides with marker ink")
    hole_fraction: float = Field(default=0.3, ge=0.0, le=1.0, description="share of slides with holes and tears")
    stain_shift: float = Field(
        default=1.0, ge=0.0, le=5.0, description="strength of per-site stain differences (0 = all sites stained alike)"
    )
    strong_shift_site: int | None = Field(
        default=None,
        examples=[4],
        ge=1,
        description="1-based index of a site stained with strong-shift-factor × the shift",
    )
    strong_shift_factor: float = Field(default=3.0, ge=1.0, le=10.0, description="shift multiplier of that site")
    slide_stain_jitter: float = Field(
        default=0.3, ge=0.0, le=5.0, description="per-slide stain variation around its site's stain"
    )
    split_fractions: tuple[float, float, float] = Field(
        default=(0.6, 0.2, 0.2), description="train/val/test shares, stratified by label, grouped by patient"
    )
    paired_patient_fraction: float = Field(
        default=0.25, ge=0.0, le=1.0, description="share of slides that belong to a patient with two slides"
    )
    mask_mpp: PositiveFloat = Field(default=8.0, description="µm per pixel of the ground-truth tumor masks")
    compression: Literal["zlib", "none", "jpeg"] = Field(
        default="zlib", description="tile compression ('jpeg' is lossy and needs the imagecodecs package)"
    )
    compression_level: int = Field(default=1, ge=1, le=9, description="zlib level (1 is fastest)")
    tile_size: int = Field(default=256, ge=64, le=2048, description="TIFF tile side, px (multiple of 16)")
    workers: int = Field(default=1, ge=1, le=256, description="slides rendered in parallel processes")
    overwrite: bool = Field(
        default=False, description="replace a different cohort already in out-dir (else such a run is refused)"
    )
    progress: bool = Field(default=True, description="show progress bars")
    clinical_missingness: list[float] | None = Field(
        default=None,
        examples=[[0.0, 0.5, 1.0]],
        description="write clinical.csv (one row per patient; client/synth/clinical.py) with this share of patients "
        "missing, per site (cycled); unset writes no clinical table",
    )

    @field_validator("clinical_missingness")
    @classmethod
    def _missingness_range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(not 0.0 <= v <= 1.0 for v in value)):
            raise ValueError(f"need one or more shares in [0, 1], got {value}")
        return value

    @field_validator("slide_size_um")
    @classmethod
    def _size_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if lo > hi:
            raise ValueError(f"minimum {lo} is larger than maximum {hi}")
        if lo < 200.0:
            raise ValueError(f"slides must be at least 200 µm across, got {lo}")
        if hi > 200_000.0:
            raise ValueError(f"slides must be at most 200000 µm across, got {hi}")
        return value

    @field_validator("tumor_area_fraction")
    @classmethod
    def _fraction_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"need 0 < min <= max < 1, got ({lo}, {hi})")
        return value

    @field_validator("split_fractions")
    @classmethod
    def _splits_sum(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or abs(sum(value) - 1.0) > 1e-6 or value[0] <= 0:
            raise ValueError(f"train, val, test shares must be >= 0, train > 0, and sum to 1; got {list(value)}")
        return value

    @field_validator("tile_size")
    @classmethod
    def _tile_multiple(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"must be a multiple of 16, got {value}")
        return value

    @field_validator("site_names")
    @classmethod
    def _names_valid(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        bad = [name for name in value if not _SITE_NAME.match(name)]
        if bad:
            raise ValueError(f"site names may hold only letters, digits, '-' and '_': {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"site names must be unique, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "SynthConfig":
        if self.site_names is not None and len(self.site_names) != self.sites:
            raise ValueError(f"site-names lists {len(self.site_names)} names but sites = {self.sites}")
        if self.task == "subtyping" and self.slides_per_site < 3:
            raise ValueError(f"task 'subtyping' has 3 classes: need slides-per-site >= 3, not {self.slides_per_site}")
        if self.strong_shift_site is not None and self.strong_shift_site > self.sites:
            raise ValueError(f"strong-shift-site = {self.strong_shift_site} but there are only {self.sites} sites")
        return self

    def site_name(self, index: int) -> str:
        """Name of the 1-based site `index`."""
        return self.site_names[index - 1] if self.site_names else f"site{index}"

    def scanner_style(self, index: int) -> str:
        """Scanner style of the 1-based site `index` (the list is cycled)."""
        return self.scanner_styles[(index - 1) % len(self.scanner_styles)]
