"""Procedural H&E rendering of any region of a synthetic slide at any resolution.

A pixel's colour is a pure function of its position in µm (plus the slide's seed), so tiles,
pyramid levels and direct renders agree. Colour follows Beer–Lambert: the optical density is
hematoxylin·h_vec + eosin·e_vec (+ ink + glass), rgb = 255·exp(-OD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from fedslide.client.synth.fields import SlideFields
from fedslide.client.synth.procedural import (
    Axis,
    NucleusLayer,
    derive_key,
    field_window_max,
    nuclei,
    sample_field,
    value_noise,
)
from fedslide.client.synth.stains import Stain

NOISE_TABLE_SIZE = 256
MAX_SUPERSAMPLE = 4
MAX_SAMPLES_PER_BAND = 1 << 18  # bounds the working memory of one render call (~25 float32 arrays of this)


@dataclass(frozen=True)
class Appearance:
    """Tissue appearance constants (stain amounts are in units of the stain vectors)."""

    eosin_stroma: float = 0.62  # eosin in stroma
    hematoxylin_stroma: float = 0.33  # diffuse hematoxylin counterstain of stroma
    fibre_contrast: float = 0.8  # contrast of the collagen-fibre stripes
    fibre_period_um: float = 3.5
    bundle_scale_um: float = 7.0
    warp_um: float = 2.5  # largest displacement of the coordinate warp
    warp_scale_um: float = 9.0
    nucleus_displaces_eosin: float = 0.8  # share of eosin a nucleus replaces
    normal_nucleus_h: float = 1.15  # hematoxylin of a normal (stromal) nucleus
    tumor_nucleus_h: float = 1.6  # hematoxylin of a tumor nucleus (hyperchromatic)
    tumor_eosin_drop: float = -0.13  # eosin change between tumor nuclei (< 0: more eosinophilic)
    tumor_hematoxylin_drop: float = 0.75  # share of the stroma's diffuse hematoxylin missing in tumor
    chromatin_contrast: float = 0.6
    tissue_edge_um: float = 2.0
    tumor_ramp_um: float = 8.0
    ink_edge_um: float = 3.0
    pixel_noise_od: float = 0.018
    normal_cell_um: float = 10.0
    normal_occupancy: float = 0.35
    normal_radius_um: tuple[float, float] = (2.4, 3.6)
    normal_aspect: tuple[float, float] = (0.4, 0.85)
    tumor_cell_um: float = 3.0
    tumor_occupancy: float = 0.85
    tumor_radius_um: tuple[float, float] = (0.7, 1.05)
    tumor_aspect: tuple[float, float] = (0.65, 1.0)


@dataclass(frozen=True)
class SlideModel:
    """Everything needed to render a slide: coarse fields, stain, appearance and the noise seed."""

    fields: SlideFields
    stain: Stain
    seed: int
    appearance: Appearance = field(default_factory=Appearance)

    @property
    def width_um(self) -> float:
        """Physical width of the slide, µm."""
        return self.fields.width_um

    @property
    def height_um(self) -> float:
        """Physical height of the slide, µm."""
        return self.fields.height_um

    @property
    def is_tumor(self) -> bool:
        """Whether the slide holds tumor."""
        return self.fields.tumor_sdf is not None

    def key(self, channel: int) -> int:
        """The hash key of one noise channel of this slide."""
        return derive_key(self.seed, channel)

    @cached_property
    def normal_layer(self) -> NucleusLayer:
        """Sparse, larger stromal nuclei present in all tissue."""
        a = self.appearance
        return NucleusLayer(
            cell_um=a.normal_cell_um,
            occupancy=a.normal_occupancy,
            radius_um=a.normal_radius_um,
            aspect=a.normal_aspect,
            darkness=(0.75 * a.normal_nucleus_h, 1.25 * a.normal_nucleus_h),
            key=self.key(10),
        )

    @cached_property
    def tumor_layer(self) -> NucleusLayer:
        """Crowded small hyperchromatic, pleomorphic tumor nuclei."""
        a = self.appearance
        return NucleusLayer(
            cell_um=a.tumor_cell_um,
            occupancy=a.tumor_occupancy,
            radius_um=a.tumor_radius_um,
            aspect=a.tumor_aspect,
            darkness=(0.7 * a.tumor_nucleus_h, 1.3 * a.tumor_nucleus_h),
            key=self.key(11),
        )

    @cached_property
    def keys(self) -> tuple[int, ...]:
        """Hash keys of the texture channels."""
        return tuple(self.key(channel) for channel in range(6))

    @cached_property
    def noise_table(self) -> np.ndarray:
        """Periodic per-sample noise (float32, standard normal), a pure function of the seed."""
        rng = np.random.default_rng(self.key(99))
        return rng.standard_normal((NOISE_TABLE_SIZE, NOISE_TABLE_SIZE)).astype(np.float32)


def default_supersample(mpp: float) -> int:
    """Samples per output pixel along one axis: enough to sample at ≤ 1 µm, at most MAX_SUPERSAMPLE."""
    return int(min(MAX_SUPERSAMPLE, max(1, int(np.ceil(mpp / 1.0 - 1e-9)))))


def _stain_amounts(
    model: SlideModel, ys: Axis, xs: Axis, spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Hematoxylin and eosin amounts and tissue opacity per sample; None where the region holds no tissue."""
    a = model.appearance
    f = model.fields
    keys = model.keys
    edge = max(a.tissue_edge_um, spacing)
    if field_window_max(f.tissue_sdf, f.spacing_um, ys, xs) < -(a.warp_um + 2.0 * edge + 2.0 * f.spacing_um):
        return None
    one = np.float32(1.0)
    half = np.float32(0.5)

    # a smooth warp of the coordinates: wavy fibres, irregular nuclear arrangement, ragged edges
    warp_x = value_noise(ys, xs, a.warp_scale_um, a.warp_scale_um, keys[1])
    warp_x -= half
    warp_x *= np.float32(2.0 * a.warp_um)
    warp_y = value_noise(ys, xs, a.warp_scale_um, a.warp_scale_um, keys[2])
    warp_y -= half
    warp_y *= np.float32(2.0 * a.warp_um)
    x = warp_x + xs.um.astype(np.float32)[None, :]
    y = warp_y + ys.um.astype(np.float32)[:, None]

    # tissue alpha with a ragged edge, times the section-thickness gain
    tissue = sample_field(f.tissue_sdf, f.spacing_um, ys, xs)
    tissue += warp_x
    tissue *= np.float32(1.0 / edge)
    tissue += half
    np.clip(tissue, 0.0, 1.0, out=tissue)
    opacity = tissue.copy()
    tissue *= sample_field(f.gain, f.spacing_um, ys, xs)

    # collagen fibres: wavy stripes, horizontal or vertical by region, in bundles
    w = np.float32(2.0 * np.pi / a.fibre_period_um)
    horiz = np.sin(y * w)
    vert = np.sin(x * w)
    horiz -= vert
    horiz *= sample_field(f.orientation, f.spacing_um, ys, xs)
    horiz += vert  # in [-1, 1], mean 0
    bundles = value_noise(ys, xs, a.bundle_scale_um, a.bundle_scale_um, keys[3])
    eosin = horiz * np.float32(a.fibre_contrast)
    eosin *= bundles
    eosin += bundles
    eosin += half  # mean 1
    eosin *= np.float32(a.eosin_stroma)

    cover, amount = nuclei(x, y, spacing, model.normal_layer)
    hema = cover * amount

    if f.tumor_sdf is not None and field_window_max(f.tumor_sdf, f.spacing_um, ys, xs) > -(
        a.tumor_ramp_um + 2.0 * f.spacing_um
    ):
        tumor = sample_field(f.tumor_sdf, f.spacing_um, ys, xs)
        tumor *= np.float32(1.0 / a.tumor_ramp_um)
        tumor += half
        np.clip(tumor, 0.0, 1.0, out=tumor)
        t_cover, t_amount = nuclei(x, y, spacing, model.tumor_layer)
        t_cover *= tumor
        hema += t_cover * t_amount
        cover += t_cover
        np.minimum(cover, one, out=cover)
        eosin *= one - np.float32(a.tumor_eosin_drop) * tumor
        hema += (one - np.float32(a.tumor_hematoxylin_drop) * tumor) * np.float32(a.hematoxylin_stroma)
    else:
        hema += np.float32(a.hematoxylin_stroma)
    if spacing <= 0.6:  # chromatin granularity; at coarser sampling only its mean (1) survives
        chromatin = value_noise(ys, xs, 0.8, 0.8, keys[4])
        chromatin -= half
        chromatin *= np.float32(2.0 * a.chromatin_contrast)
        chromatin += one
        hema *= chromatin
    eosin *= one - np.float32(a.nucleus_displaces_eosin) * cover
    hema *= tissue
    eosin *= tissue
    return hema, eosin, opacity


def _ink_alpha(model: SlideModel, ys: Axis, xs: Axis, spacing: float) -> np.ndarray | None:
    """Pen-ink opacity per sample, or None where the region holds no ink."""
    f = model.fields
    if f.ink_sdf is None:
        return None
    edge = max(model.appearance.ink_edge_um, spacing)
    if field_window_max(f.ink_sdf, f.spacing_um, ys, xs) < -(edge + 2.0 * f.spacing_um):
        return None
    ink = sample_field(f.ink_sdf, f.spacing_um, ys, xs)
    ink *= np.float32(1.0 / edge)
    ink += np.float32(0.5)
    np.clip(ink, 0.0, 1.0, out=ink)
    ink *= value_noise(ys, xs, 20.0, 20.0, model.keys[5]) * np.float32(0.35) + np.float32(0.8)
    return ink


def render_samples(model: SlideModel, ys: Axis, xs: Axis, spacing: float) -> np.ndarray | tuple[float, float, float]:
    """Intensities in [0, 255] (float32, (len(ys), len(xs), 3)) at the given samples.

    A region with neither tissue nor ink is returned as its single (blank glass) colour.
    """
    od_vectors = model.stain.od_matrix()
    amounts = _stain_amounts(model, ys, xs, spacing)
    ink = _ink_alpha(model, ys, xs, spacing)
    if amounts is None and ink is None:
        glass = np.exp(-od_vectors[2]) * np.float32(255.0)
        return (float(glass[0]), float(glass[1]), float(glass[2]))
    noise = None
    if amounts is not None:  # sensor / stain grain inside tissue only, so glass compresses well
        table = model.noise_table
        noise = np.take(np.take(table, ys.index % NOISE_TABLE_SIZE, axis=0), xs.index % NOISE_TABLE_SIZE, axis=1)
        noise *= amounts[2]
        noise *= np.float32(model.appearance.pixel_noise_od)
    ink_od = np.asarray(model.fields.ink_od, dtype=np.float32)
    out = np.empty((len(ys.um), len(xs.um), 3), dtype=np.float32)
    for c in range(3):
        od = out[:, :, c]
        od.fill(od_vectors[2, c])
        if amounts is not None and noise is not None:
            od += noise
            od += amounts[0] * od_vectors[0, c]
            od += amounts[1] * od_vectors[1, c]
        if ink is not None:
            od += ink * ink_od[c]
    np.negative(out, out=out)
    np.exp(out, out=out)
    out *= np.float32(255.0)
    return out


def antialias_sigma_um(mpp: float) -> float:
    """Gaussian prefilter (µm) for pixels of `mpp`: mpp/2 for pixels of 1 µm or coarser, else none."""
    return 0.5 * mpp if mpp >= 1.0 - 1e-9 else 0.0


def _filter_taps(s: int, spacing: float, sigma_um: float) -> tuple[int, np.ndarray]:
    """First tap offset (in samples, relative to i·s) and normalised Gaussian weights."""
    centre = (s - 1) / 2.0
    reach = 3.0 * sigma_um / spacing
    lo = int(np.floor(centre - reach))
    hi = int(np.ceil(centre + reach))
    offsets = np.arange(lo, hi + 1)
    weights = np.exp(-(((offsets - centre) * spacing) ** 2) / (2.0 * sigma_um**2))
    return lo, (weights / weights.sum()).astype(np.float32)


def _decimate(samples: np.ndarray, axis: int, count: int, s: int, weights: np.ndarray) -> np.ndarray:
    """out[i] = Σ_k weights[k] · samples[i·s + k] along `axis`, for i < count (fixed summation order)."""
    out = None
    for k, w in enumerate(weights):
        part = np.take(samples, np.arange(count) * s + k, axis=axis)
        part *= w
        if out is None:
            out = part
        else:
            out += part
    assert out is not None
    return out


def _blank(colour: tuple[float, float, float], width: int, height: int) -> np.ndarray:
    """A uniform uint8 region, rounded like rendered pixels."""
    rgb = np.clip(np.rint(np.asarray(colour, dtype=np.float32)), 0, 255).astype(np.uint8)
    return np.broadcast_to(rgb, (height, width, 3)).copy()


def render_region(
    model: SlideModel, mpp: float, x: int, y: int, width: int, height: int, supersample: int | None = None
) -> np.ndarray:
    """RGB uint8 (height, width, 3) of the pixels [x, x+width) × [y, y+height) of a grid of `mpp` µm/px.

    The grid's pixel (0, 0) is the slide's top-left corner. The region is sampled `supersample`
    times finer along each axis (default: default_supersample(mpp)); pixels of 1 µm or coarser
    are Gaussian-prefiltered (σ = mpp/2) like a scanner's downsampled levels, finer ones
    box-averaged, so every level is anti-aliased. Each pixel is a pure function of its position:
    the result does not depend on how a level is cut into regions. Work proceeds in bands of
    rows, so memory stays bounded for any region width × supersampling.
    """
    s = supersample or default_supersample(mpp)
    band = max(1, MAX_SAMPLES_PER_BAND // max(1, width * s * s))
    if height <= band:
        return _render_band(model, mpp, x, y, width, height, s)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, band):
        rows = min(band, height - top)
        out[top : top + rows] = _render_band(model, mpp, x, y + top, width, rows, s)
    return out


def _render_band(model: SlideModel, mpp: float, x: int, y: int, width: int, height: int, s: int) -> np.ndarray:
    """render_region for one band of rows."""
    spacing = mpp / s
    sigma = antialias_sigma_um(mpp)
    if sigma > 0:
        lo, weights = _filter_taps(s, spacing, sigma)
        ys = Axis.make(y * s + lo, (height - 1) * s + len(weights), spacing)
        xs = Axis.make(x * s + lo, (width - 1) * s + len(weights), spacing)
        samples = render_samples(model, ys, xs, spacing)
        if isinstance(samples, tuple):
            return _blank(samples, width, height)
        rgb = _decimate(_decimate(samples, 0, height, s, weights), 1, width, s, weights)
    else:
        ys = Axis.make(y * s, height * s, spacing)
        xs = Axis.make(x * s, width * s, spacing)
        samples = render_samples(model, ys, xs, spacing)
        if isinstance(samples, tuple):
            return _blank(samples, width, height)
        rgb = samples
        if s > 1:
            rgb = rgb.reshape(height, s, width, s, 3).mean(axis=(1, 3), dtype=np.float32)
    np.rint(rgb, out=rgb)
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8)
