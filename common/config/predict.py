"""Config of `fedslide predict`: low-res-only slide inference with a distilled student (TOML section [predict]).

Tissue and tiling settings are not here: they come from the model bundle, so inference tiles a
slide exactly as the student's training data was tiled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from fedslide.common.config.base import StageConfig
from fedslide.common.config.preprocess import SlideConfig


_Channel = Annotated[int, Field(ge=0, le=255)]
RGB = tuple[_Channel, _Channel, _Channel]


def zoom_rule(k: int, threshold: float | None) -> str:
    """A zoom selection in words: 'top-4', 'relevance > 0.5' or 'relevance > 0.5, at most 4'."""
    if threshold is None:
        return f"top-{k}"
    cap = f", at most {k}" if k else ""
    return f"relevance > {threshold:g}{cap}"


class QupathConfig(StageConfig):
    """What the QuPath GeoJSON export (`predict --geojson`, `export-qupath`) writes per slide."""

    tumour_class: str | None = Field(
        default=None,
        examples=["tumor"],
        description="class whose probability is the patches' 'tumour probability' and whose regions are drawn "
        "(default: the class named tumor/tumour/cancer/carcinoma/malignant, else the second of two classes)",
    )
    region_threshold: float = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description="patches whose tumour probability is at least this form the predicted tumour regions",
    )
    patch_object: Literal["tile", "detection"] = Field(
        default="tile", description="QuPath objectType of the kept patches (student instances)"
    )
    tumour_color: RGB = Field(default=(200, 0, 0), description="QuPath colour [r, g, b] of the tumour class")
    tissue_color: RGB = Field(default=(0, 160, 0), description="QuPath colour [r, g, b] of the tissue annotations")
    simplify_px: float = Field(
        default=2.0,
        ge=0.0,
        description="simplify tissue contours by this many thumbnail pixels (0 = exact pixel staircase)",
    )


class PredictConfig(StageConfig):
    """How slides are read and encoded at inference, and what is written."""

    resolution: Literal["low", "high"] = Field(
        default="low",
        description="'low': the student on low-res patches only; 'high': reference mode, every high-res patch "
        "encoded and the teacher run (to measure the high-res cost)",
    )
    zoom_k: NonNegativeInt = Field(
        default=0,
        description="after the low-res pass, encode the high-res children of the K most attended low-res "
        "patches and run the teacher on them (0 = off; low resolution only)",
    )
    zoom_threshold: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        examples=[0.5],
        description="after the low-res pass, zoom into the low-res patches whose relevance (student attention "
        "min-max scaled over the slide, in [0, 1]) is above this threshold, as AHDMIL's pre-screen; with zoom-k "
        "> 0 at most the K most relevant of them (default: off)",
    )
    batch_size: PositiveInt = Field(default=32, description="patches per encoder forward pass")
    num_workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description="DataLoader worker processes reading patches (a pass of at most batch-size patches is read "
        "in-process)",
    )
    threads: PositiveInt | None = Field(
        default=None, examples=[2], description="torch CPU threads (default: all cores)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="encoder device; auto = cuda when present"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="encoder autocast: auto = bf16 on GPU, fp32 on CPU"
    )
    encoder_weights: Path | None = Field(
        default=None,
        examples=["/path/to/weights.pth"],
        description="local weights file of the bundle's encoder (encoders whose weights do not ship with a package); "
        "with a bundle that carries encoder.pt, a file of other contents is an error naming both",
    )
    low_encoder_weights: Path | None = Field(
        default=None,
        examples=["/site/finetune/efficientnet_lite0.pt"],
        description="fine-tuned 5x encoder weights (`fedslide finetune`) for a bundle that records their hash but "
        "does not carry the file; refused unless the sha256 matches the bundle's (and, with a bundle that carries "
        "low_encoder.pt, unless it is the same bytes)",
    )
    clinical: Path | None = Field(
        default=None,
        examples=["/site/clinical.csv"],
        description="clinical table of the slides (slide_id or patient_id, then the bundle's BD schema): slides with a "
        "complete row are read by the bundle's multi-modal BD model, the others by its single-modal branch",
    )
    clinical_patients: Path | None = Field(
        default=None,
        examples=["/site/labels.csv"],
        description="CSV with slide_id and patient_id columns (e.g. the site's labels.csv) for a patient-keyed "
        "clinical table",
    )
    heatmaps: bool = Field(default=True, description="write heatmaps/<slide_id>.png")
    geojson: bool = Field(
        default=False, description="also write qupath/<slide_id>.geojson (QuPath import; see `export-qupath`)"
    )
    qupath: QupathConfig = Field(default_factory=QupathConfig)
    heatmap_size: int = Field(default=1024, ge=128, le=8192, description="long side of the heatmap's slide image, px")
    progress: bool = Field(default=True, description="show progress bars")
    slide: SlideConfig = Field(default_factory=SlideConfig)

    @property
    def mpp_override(self) -> float | None:
        """µm per level-0 pixel for slides without resolution metadata (`slide.mpp-override`, `--mpp`)."""
        return self.slide.mpp_override

    @property
    def zoom(self) -> bool:
        """Whether the high-res zoom pass runs (top-K, relevance threshold, or both)."""
        return bool(self.zoom_k) or self.zoom_threshold is not None

    @property
    def zoom_rule(self) -> str:
        """The zoom selection in words (`zoom_rule`)."""
        return zoom_rule(self.zoom_k, self.zoom_threshold)
