"""Inference on one slide: thumbnail → tissue → grid → low-res encoding → student (→ optional zoom / heatmap).

`predict_slide` is the Python entry point; it reads only low-res patches unless asked for the
high-res reference mode or a zoom pass. Bad slides raise `SlideError` (naming the slide).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedslide.client.encoders.base import PatchEncoder
from fedslide.client.encoding import encode_grid
from fedslide.client.heatmaps import InstanceMap, render_heatmap, write_heatmap
from fedslide.client.inference.model import SlideSettings, slide_settings
from fedslide.client.inference.qupath import SlideOverlay, instance_probabilities
from fedslide.client.inference.zoom import region_scores, select_above, select_regions, subset_grid
from fedslide.client.patch_loader import RegionDataset
from fedslide.client.slides import SlideError, SlideReader
from fedslide.client.stain_normalize import StainNormalizer, stain_normalizer_from_identity
from fedslide.client.tiling import PairedGrid, paired_grid
from fedslide.client.tissue import segment_tissue
from fedslide.common.config.predict import PredictConfig
from fedslide.common.distillation.bundle import StudentBundle


@dataclass
class SlideTiming:
    """Seconds spent on one slide. `total_s` runs from opening the slide file to the probabilities."""

    open_s: float = 0.0
    thumbnail_tissue_s: float = 0.0  # thumbnail, tissue mask and grid
    read_encode_s: float = 0.0
    model_s: float = 0.0
    total_s: float = 0.0
    heatmap_s: float = 0.0  # after the probabilities; not in total_s
    overlay_s: float = 0.0  # per-instance probabilities + overlay record for the QuPath export; not in total_s

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@dataclass
class ZoomResult:
    """The zoom pass of one slide: the teacher on the high-res children of the top-K low-res regions."""

    k_requested: int
    regions: np.ndarray  # [K'] low patch indices read at high res
    probs: np.ndarray | None  # [C]; None when no region had kept high-res children
    label: str
    patches_high: int  # high-res patches encoded
    patches_high_total: int  # kept high-res patches of the whole slide (what --resolution high encodes)
    read_encode_s: float
    model_s: float

    @property
    def seconds(self) -> float:
        return self.read_encode_s + self.model_s

    @property
    def cost_saved(self) -> float:
        """Share of the slide's high-res encoding avoided (1 - encoded / total)."""
        return 1.0 - self.patches_high / self.patches_high_total if self.patches_high_total else 1.0


@dataclass
class LowPass:
    """What the student saw: low-res patch coords, features and tokens (float16-rounded, as in feature files)."""

    coords: np.ndarray  # [N, 2] level-0 top-left
    features: np.ndarray  # [N, D] float32
    tokens: np.ndarray | None  # [N, G*G, D] float32 (values representable in float16)


@dataclass
class SlidePrediction:
    """One slide's prediction and what it cost."""

    slide_id: str
    path: str
    resolution: str  # "low" (student) or "high" (teacher, reference mode)
    class_names: list[str]
    probs: np.ndarray  # [C]
    label: str
    patches: int  # patches encoded for the prediction (low patches, or high patches in high mode)
    patches_low: int
    patches_high_total: int
    slide_mpp: float
    timing: SlideTiming
    attention: InstanceMap  # per-instance attention (level-0 cells)
    zoom: ZoomResult | None = None
    heatmap: Path | None = None
    overlay: Path | None = None  # overlay record of the QuPath export (`client.inference.qupath`)
    instance_probs: np.ndarray | None = field(default=None, repr=False)  # [M, C] each instance alone, if asked
    low_pass: LowPass | None = field(default=None, repr=False)
    ood_score: float | None = None  # how unlike the training slides its 5x features are (bundle.ood); None: no stats
    ood_flag: bool = False  # ood_score above the bundle's threshold
    clinical_branch: str | None = None  # BD branch that read the slide (multi/single); None: the student alone

    @property
    def probability(self) -> float:
        """Probability of the predicted class."""
        return float(self.probs.max())


def _label(probs: np.ndarray, class_names: list[str]) -> str:
    i = int(np.argmax(probs))
    return class_names[i] if i < len(class_names) else str(i)


def _encode(
    reader: SlideReader,
    grid: PairedGrid,
    settings: SlideSettings,
    encoder: PatchEncoder,
    cfg: PredictConfig,
    resolution: str,
    token_grid: int,
    stain: StainNormalizer | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features [n, D] (and tokens) of every grid patch of one resolution, in grid order, each patch
    stain-normalised as preprocessing did for the bundle's training features (`stain`)."""
    n = len(grid.low_coords) if resolution == "low" else len(grid.high_coords)
    dataset = RegionDataset(
        reader.path,
        cfg.mpp_override,
        cfg.slide.mpp_tolerance,
        grid,
        settings.tiling,
        want_low=resolution == "low",
        want_high=resolution == "high",
        stain=stain,
    )
    device = _module_device(encoder)
    features = np.zeros((n, encoder.dim), dtype=np.float32)
    tokens = np.zeros((n, token_grid * token_grid, encoder.dim), dtype=np.float32) if token_grid else None
    for batch in encode_grid(
        dataset,
        encoder,
        device=device,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        precision=cfg.precision,
        token_grid=token_grid,
    ):
        features[batch.index] = batch.features
        if tokens is not None and batch.tokens is not None:
            tokens[batch.index] = batch.tokens.astype(np.float16)  # as stored in (and read from) feature files
    return features, tokens


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _no_tissue(path: Path, tissue: np.ndarray, settings: SlideSettings, high: bool) -> SlideError:
    t = settings.tiling
    return SlideError(
        f"slide {path.name}: no tissue found (tissue covers {tissue.mean():.1%} of the thumbnail; the bundle's "
        f"thresholds min-tissue-low={t.min_tissue_low}"
        + (f", min-tissue-high={t.min_tissue_high}" if high else "")
        + ")"
    )


@dataclass
class _ModelPass:
    """The outcome of encoding one resolution and running its model."""

    probs: np.ndarray
    attention: InstanceMap
    encode_s: float
    region_scores: np.ndarray | None = None  # low pass: student attention summed per low patch
    arrays: LowPass | None = None
    instance_probs: np.ndarray | None = None  # [M, C] each instance read alone (QuPath export)
    instance_s: float = 0.0  # seconds spent on instance_probs (not model time)
    ood_score: float | None = None  # low pass: the bundle's OOD score of the 5x features


def _low_pass(
    reader: SlideReader,
    grid: PairedGrid,
    settings: SlideSettings,
    bundle: StudentBundle,
    encoder: PatchEncoder,
    cfg: PredictConfig,
    keep_arrays: bool,
    per_instance: bool = False,
    stain: StainNormalizer | None = None,
) -> _ModelPass:
    """Encode the low-res grid (with tokens when the student reads them) and run the student (and, if asked,
    the student on each instance alone)."""
    t0 = time.perf_counter()
    feats, tokens = _encode(reader, grid, settings, encoder, cfg, "low", settings.token_grid, stain)
    encode_s = time.perf_counter() - t0
    probs, att, low_index, slot = bundle.predict_low(
        torch.from_numpy(feats),
        torch.from_numpy(tokens) if tokens is not None else None,
        torch.from_numpy(grid.low_coords),
        low_patch_size_level0=grid.low_size_level0,
    )
    att_np, low_np = att.numpy().astype(np.float64), low_index.numpy()
    attention = _student_attention(grid, bundle, att_np, low_np, slot.numpy())
    inst_probs, t_inst = None, time.perf_counter()
    if per_instance:
        instances, _, _ = bundle.student_instances(
            torch.from_numpy(feats), torch.from_numpy(tokens) if tokens is not None else None
        )
        inst_probs = instance_probabilities(bundle.student, instances, torch.from_numpy(attention.coords))
    return _ModelPass(
        probs=probs.numpy().astype(np.float64),
        attention=attention,
        encode_s=encode_s,
        region_scores=region_scores(att_np, low_np, len(grid.low_coords)),
        arrays=LowPass(grid.low_coords.copy(), feats, tokens) if keep_arrays else None,
        instance_probs=inst_probs,
        instance_s=time.perf_counter() - t_inst if per_instance else 0.0,
        ood_score=bundle.ood.score(feats) if bundle.ood is not None else None,
    )


def _high_pass(
    reader: SlideReader,
    grid: PairedGrid,
    settings: SlideSettings,
    bundle: StudentBundle,
    encoder: PatchEncoder,
    cfg: PredictConfig,
    per_instance: bool = False,
    stain: StainNormalizer | None = None,
) -> _ModelPass:
    """Reference mode: encode every kept high-res patch and run the teacher (and, if asked, on each patch alone)."""
    t0 = time.perf_counter()
    feats, _ = _encode(reader, grid, settings, encoder, cfg, "high", 0, stain)
    encode_s = time.perf_counter() - t0
    probs, att = bundle.predict_high(torch.from_numpy(feats), torch.from_numpy(grid.high_coords))
    attention = InstanceMap(grid.high_coords.astype(np.float64), grid.high_size_level0, att.numpy().astype(np.float64))
    inst_probs, t_inst = None, time.perf_counter()
    if per_instance and bundle.teacher is not None:
        inst_probs = instance_probabilities(bundle.teacher, torch.from_numpy(feats), torch.from_numpy(grid.high_coords))
    return _ModelPass(
        probs=probs.numpy().astype(np.float64),
        attention=attention,
        encode_s=encode_s,
        instance_probs=inst_probs,
        instance_s=time.perf_counter() - t_inst if per_instance else 0.0,
    )


def predict_slide(
    path: Path | str,
    bundle: StudentBundle,
    encoder: PatchEncoder,
    cfg: PredictConfig,
    *,
    heatmap_path: Path | None = None,
    overlay_path: Path | None = None,
    keep_arrays: bool = False,
    low_encoder: PatchEncoder | None = None,
) -> SlidePrediction:
    """Predict one slide with the bundle (see the module doc); write its heatmap to `heatmap_path` and the
    QuPath export's overlay record (tissue, instances, per-instance probabilities) to `overlay_path` if given.

    `encoder` must be the bundle's (see `client.inference.model.load_encoder`); `low_encoder` encodes the 5x
    patches when the bundle's student was trained on a fine-tuned 5x encoder (`load_encoder(..., "low")`;
    None = `encoder`). `keep_arrays` keeps the low-res features and tokens the student saw on the result.
    """
    path = Path(path)
    settings = slide_settings(bundle)
    class_names = list(bundle.meta.class_names)
    high = cfg.resolution == "high"
    stain = stain_normalizer_from_identity(bundle.meta.stain_normalization)  # as the training features were made
    t0 = time.perf_counter()
    with SlideReader(path, cfg.mpp_override, cfg.slide.mpp_tolerance) as reader:
        t_open = time.perf_counter()
        thumb, thumb_mpp = reader.thumbnail(settings.tissue.thumbnail_mpp)
        tissue = segment_tissue(thumb, float(np.mean(thumb_mpp)), settings.tissue)
        grid = paired_grid(*reader.dimensions, reader.mpp, settings.tiling, tissue, thumb_mpp)
        if len(grid.low_coords) == 0 or (high and len(grid.high_coords) == 0):
            raise _no_tissue(path, tissue, settings, high)
        t_grid = time.perf_counter()
        if high:
            result = _high_pass(reader, grid, settings, bundle, encoder, cfg, overlay_path is not None, stain)
        else:
            result = _low_pass(
                reader,
                grid,
                settings,
                bundle,
                low_encoder or encoder,
                cfg,
                keep_arrays,
                overlay_path is not None,
                stain,
            )
        t_model = time.perf_counter() - result.instance_s
        timing = SlideTiming(
            open_s=t_open - t0,
            thumbnail_tissue_s=t_grid - t_open,
            read_encode_s=result.encode_s,
            model_s=t_model - t_grid - result.encode_s,
            total_s=t_model - t0,
        )
        zoom = None
        if cfg.zoom and result.region_scores is not None:
            zoom = _zoom(reader, grid, settings, bundle, encoder, cfg, result.region_scores, stain)
        prediction = SlidePrediction(
            slide_id=reader.slide_id,
            path=str(path),
            resolution=cfg.resolution,
            class_names=class_names,
            probs=result.probs,
            label=_label(result.probs, class_names),
            patches=len(grid.high_coords) if high else len(grid.low_coords),
            patches_low=len(grid.low_coords),
            patches_high_total=len(grid.high_coords),
            slide_mpp=reader.mpp,
            timing=timing,
            attention=result.attention,
            zoom=zoom,
            low_pass=result.arrays,
            instance_probs=result.instance_probs,
            ood_score=result.ood_score,
            ood_flag=bundle.ood is not None and result.ood_score is not None and bundle.ood.flagged(result.ood_score),
        )
        if overlay_path is not None:
            t_o = time.perf_counter()
            prediction.overlay = _overlay(prediction, reader, tissue, thumb_mpp).save(overlay_path)
            timing.overlay_s = time.perf_counter() - t_o + result.instance_s
        if heatmap_path is not None:
            t_h = time.perf_counter()
            prediction.heatmap = _write_heatmap(heatmap_path, reader, prediction, grid, tissue, thumb_mpp, cfg, bundle)
            timing.heatmap_s = time.perf_counter() - t_h
    return prediction


def _overlay(
    pred: SlidePrediction, reader: SlideReader, tissue: np.ndarray, tissue_mpp: tuple[float, float]
) -> SlideOverlay:
    att = pred.attention
    probs = pred.instance_probs
    return SlideOverlay(
        slide_id=pred.slide_id,
        width=int(reader.dimensions[0]),
        height=int(reader.dimensions[1]),
        mpp=float(reader.mpp),
        resolution=pred.resolution,
        class_names=pred.class_names,
        probs=pred.probs,
        label=pred.label,
        cell_coords=att.coords,
        cell_size=float(att.size_level0),
        attention=att.values,
        instance_probs=probs if probs is not None else np.zeros((len(att.values), 0)),
        tissue=np.asarray(tissue, dtype=bool),
        tissue_mpp=(float(tissue_mpp[0]), float(tissue_mpp[1])),
    )


def _student_attention(
    grid: PairedGrid, bundle: StudentBundle, attention: np.ndarray, low_index: np.ndarray, slot: np.ndarray
) -> InstanceMap:
    """Student attention as level-0 cells: a token instance is its child slot, a pooled one its whole low patch."""
    g = bundle.meta.token_grid if bundle.meta.student_input == "tokens" else 0
    base = grid.low_coords[low_index].astype(np.float64)
    if g <= 0:
        return InstanceMap(base, grid.low_size_level0, attention.astype(np.float64))
    step = grid.low_size_level0 / g
    offset = np.stack([slot % g, slot // g], axis=1).astype(np.float64) * step
    return InstanceMap(base + offset, step, attention.astype(np.float64))


def _zoom(
    reader: SlideReader,
    grid: PairedGrid,
    settings: SlideSettings,
    bundle: StudentBundle,
    encoder: PatchEncoder,
    cfg: PredictConfig,
    attention_scores: np.ndarray,
    stain: StainNormalizer | None = None,
) -> ZoomResult:
    """Encode the high-res children of the selected low regions (top-K and/or relevance threshold) and run the
    teacher on them."""
    t0 = time.perf_counter()
    if cfg.zoom_threshold is not None:
        regions = select_above(attention_scores, grid, cfg.zoom_threshold, cfg.zoom_k)
    else:
        regions = select_regions(attention_scores, grid, cfg.zoom_k)
    sub, _ = subset_grid(grid, regions)
    probs, label = None, ""
    feats = np.zeros((0, encoder.dim), np.float32)
    if len(sub.high_coords):
        feats, _ = _encode(reader, sub, settings, encoder, cfg, "high", 0, stain)
    t_enc = time.perf_counter()
    if len(feats):
        probs_t, _ = bundle.predict_high(torch.from_numpy(feats), torch.from_numpy(sub.high_coords))
        probs = probs_t.numpy().astype(np.float64)
        label = _label(probs, list(bundle.meta.class_names))
    return ZoomResult(
        k_requested=cfg.zoom_k,
        regions=regions,
        probs=probs,
        label=label,
        patches_high=len(sub.high_coords),
        patches_high_total=len(grid.high_coords),
        read_encode_s=t_enc - t0,
        model_s=time.perf_counter() - t_enc,
    )


def heatmap_mpp(reader: SlideReader, bundle: StudentBundle, cfg: PredictConfig) -> float:
    """µm/px of the heatmap's thumbnail: long side `heatmap-size` px, never finer than the low resolution."""
    long_um = max(reader.dimensions) * reader.mpp
    return max(reader.mpp, bundle.meta.low_mpp, long_um / cfg.heatmap_size)


def _write_heatmap(
    path: Path,
    reader: SlideReader,
    pred: SlidePrediction,
    grid: PairedGrid,
    tissue: np.ndarray,
    tissue_mpp: tuple[float, float],
    cfg: PredictConfig,
    bundle: StudentBundle,
) -> Path:
    thumb, thumb_mpp = reader.thumbnail(heatmap_mpp(reader, bundle, cfg))
    cell_um = pred.attention.size_level0 * reader.mpp
    model = "teacher, high-res patches" if pred.resolution == "high" else f"student ({bundle.meta.student_input})"
    subtitle = f"{model}: attention per {cell_um:.0f}-µm cell, {len(pred.attention.values)} instances"
    regions = None
    if pred.zoom is not None:
        side = grid.low_size_level0
        regions = [(float(x), float(y), side) for x, y in grid.low_coords[pred.zoom.regions]]
        if pred.zoom.probs is not None:
            subtitle += f"; zoom on {len(pred.zoom.regions)} regions: {pred.zoom.label} ({pred.zoom.probs.max():.2f})"
    values = pred.attention.values * max(len(pred.attention.values), 1)
    figure = render_heatmap(
        thumb,
        thumb_mpp,
        reader.mpp,
        reader.dimensions,
        InstanceMap(pred.attention.coords, pred.attention.size_level0, values),
        title=f"{pred.slide_id} — predicted {pred.label} (p = {pred.probability:.2f})",
        subtitle=subtitle,
        tissue=tissue,
        tissue_mpp=tissue_mpp,
        regions=regions,
    )
    return write_heatmap(path, figure)
