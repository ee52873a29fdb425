"""Where a site's (or a training run's) feature files are on disk: fedslide's own layout, CLAM's or TRIDENT's.

A site declares a foreign layout in `<site>/features.toml` (this model, top-level keys); `fedslide train` takes it
as `[train.features-layout]`. fedslide's layout is `<site>/features/<encoder>/{high,low}/<slide_id>.h5`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat

from fedslide.common.config.base import StageConfig

SITE_LAYOUT_FILE = "features.toml"  # <site>/features.toml: the site's feature layout (absent = fedslide's)
Layout = Literal["fedslide", "clam", "trident"]


class FeatureLayoutConfig(StageConfig):
    """Which tool's folder layout holds the feature files, and where its two resolutions are."""

    layout: Layout = Field(
        default="fedslide",
        description="'fedslide': features/<encoder>/{high,low}/<slide_id>.h5; 'clam': a CLAM feature folder "
        "(h5_files/*.h5 with features + coords, or pt_files/*.pt); 'trident': a TRIDENT job folder "
        "(<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/*.h5, coords attributes on 'coords')",
    )
    root: Path | None = Field(
        default=None,
        examples=["/data/trident_job"],
        description="the CLAM/TRIDENT output folder (relative: to the site folder); train: --features is used",
    )
    high: str | None = Field(
        default=None,
        examples=["20x_256px_0px_overlap"],
        description="CLAM: the sub-folder of root with the 20x features (its h5_files/, pt_files/); TRIDENT: the "
        "magnification folder (default: the one at high-magnification)",
    )
    low: str | None = Field(
        default=None,
        examples=["5x_256px_0px_overlap"],
        description="as `high`, for the 5x features (default TRIDENT: the folder at low-magnification)",
    )
    encoder: str | None = Field(
        default=None,
        examples=["uni_v1"],
        description="TRIDENT: the features_<encoder> folder to read (default: the only one); CLAM: the encoder's "
        "name, recorded as the files' encoder (CLAM files carry none)",
    )
    high_magnification: PositiveFloat = Field(default=20.0, description="TRIDENT: magnification of the high-res folder")
    low_magnification: PositiveFloat = Field(default=5.0, description="TRIDENT: magnification of the low-res folder")
    clam_files: Literal["h5", "pt"] = Field(
        default="h5",
        description="CLAM: read h5_files/ (features + coords) or pt_files/ (features only: no coords, so no "
        "low/high pairing and no coordinate-aware models)",
    )
