"""Coarse per-slide fields in physical units: tissue, tumor and pen-ink shapes, stain gain, fibre direction.

Shapes are stored as signed distances in µm (positive inside) on a grid of a few µm per node, so
they stay small in memory and give crisp edges when sampled at any resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import measure

from fedslide.client.synth.procedural import Axis, sample_field

INK_COLOURS: dict[str, tuple[float, float, float]] = {
    "blue": (0.95, 0.55, 0.10),
    "green": (0.85, 0.18, 0.60),
    "black": (1.00, 0.95, 0.90),
}


@dataclass(frozen=True)
class SlideFields:
    """The coarse description of one slide; node (i, j) sits at (i·spacing, j·spacing) µm."""

    width_um: float
    height_um: float
    spacing_um: float
    tissue_sdf: np.ndarray  # float32, µm, > 0 inside tissue
    gain: np.ndarray  # float32, multiplies stain amounts (section thickness)
    orientation: np.ndarray  # float32 in [0, 1]: 0 = vertical fibres, 1 = horizontal
    tumor_sdf: np.ndarray | None = None  # float32, µm, > 0 inside tumor
    ink_sdf: np.ndarray | None = None  # float32, µm, > 0 inside a pen stroke
    ink_od: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ink_colour: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Grid shape (rows, columns)."""
        return self.tissue_sdf.shape

    def tissue_fraction(self) -> float:
        """Fraction of the slide area covered by tissue."""
        return float((self.tissue_sdf > 0).mean())

    def tumor_fraction(self) -> float:
        """Fraction of the tissue area covered by tumor (0 for a normal slide)."""
        if self.tumor_sdf is None:
            return 0.0
        tissue = self.tissue_sdf > 0
        return float(((self.tumor_sdf > 0) & tissue).sum() / max(1, tissue.sum()))


def _smooth_noise(shape: tuple[int, int], sigma_cells: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation.

    Wide kernels are applied on a coarser grid and interpolated back (same look, far cheaper).
    """
    factor = max(1, int(sigma_cells // 4))
    small = shape if factor == 1 else (shape[0] // factor + 3, shape[1] // factor + 3)
    noise = ndimage.gaussian_filter(rng.standard_normal(small), sigma=max(sigma_cells / factor, 0.5), mode="reflect")
    if factor > 1:
        rows = np.arange(shape[0]) / factor + 1.0
        cols = np.arange(shape[1]) / factor + 1.0
        noise = ndimage.map_coordinates(noise, np.meshgrid(rows, cols, indexing="ij"), order=1)
    return noise / max(float(noise.std()), 1e-9)


def _signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Signed Euclidean distance to the mask boundary in µm (> 0 inside), lightly smoothed."""
    if not mask.any():
        return np.full(mask.shape, -1.0e4, dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    sdf = (inside - outside + 0.5 * (mask.astype(np.float64) * 2 - 1)) * spacing
    sdf = np.where(mask, np.maximum(sdf, 0.5 * spacing), np.minimum(sdf, -0.5 * spacing))
    return ndimage.gaussian_filter(sdf, sigma=0.8).astype(np.float32)


def _drop_small_islands(mask: np.ndarray, min_cells: int) -> np.ndarray:
    """The mask without connected components smaller than `min_cells`."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_cells
    keep[0] = False
    return keep[labels]


def _tissue_mask(
    yy: np.ndarray, xx: np.ndarray, width: float, height: float, spacing: float, holes: bool, rng: np.random.Generator
) -> np.ndarray:
    """Irregular tissue pieces inside the slide, with small lumens and (optionally) large holes and tears."""
    shape = yy.shape
    short = min(width, height)
    n_pieces = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    field = np.full(shape, -np.inf)
    for i in range(n_pieces):
        if n_pieces == 1:
            cx, cy = width * rng.uniform(0.42, 0.58), height * rng.uniform(0.42, 0.58)
            a, b = width * rng.uniform(0.30, 0.40), height * rng.uniform(0.28, 0.38)
        else:
            along_x = width >= height
            slot = (i + 0.5) / n_pieces
            cx = width * (slot if along_x else rng.uniform(0.4, 0.6))
            cy = height * (rng.uniform(0.4, 0.6) if along_x else slot)
            a = width * (0.38 / n_pieces if along_x else 0.3) * rng.uniform(0.8, 1.05)
            b = height * (0.3 if along_x else 0.38 / n_pieces) * rng.uniform(0.8, 1.05)
        theta = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        field = np.maximum(field, 1.0 - rho)
    field += 0.22 * _smooth_noise(shape, 0.08 * short / spacing, rng)
    field += 0.07 * _smooth_noise(shape, 40.0 / spacing, rng)
    border = np.minimum(np.minimum(xx, width - xx), np.minimum(yy, height - yy))
    field = np.minimum(field, (border - 40.0) / (0.1 * short))
    mask = field > 0
    mask = _drop_small_islands(mask, max(4, int(0.002 * mask.size)))
    if not mask.any():  # pathological draw: fall back to a central ellipse
        mask = ((xx - width / 2) / (0.3 * width)) ** 2 + ((yy - height / 2) / (0.3 * height)) ** 2 < 1

    depth = ndimage.distance_transform_edt(mask) * spacing
    area_mm2 = mask.sum() * spacing**2 / 1e6
    # small lumens (vessels, ducts) on every slide: below the size a tissue segmenter fills
    for _ in range(int(rng.poisson(8 * area_mm2))):
        _carve_disc(mask, depth, yy, xx, rng.uniform(8.0, 30.0), rng)
    if holes:
        for _ in range(int(rng.integers(1, 4))):
            _carve_disc(mask, depth, yy, xx, rng.uniform(90.0, 220.0), rng)
        if rng.random() < 0.6:
            _carve_tear(mask, depth, yy, xx, short, rng)
    return mask


def _random_cell_deeper_than(depth: np.ndarray, threshold: float, rng: np.random.Generator) -> int | None:
    """Flat index of a random cell whose depth exceeds `threshold` (None if there is none)."""
    flat = depth.ravel()
    tries = rng.integers(flat.size, size=256)
    hits = tries[flat[tries] > threshold]
    if hits.size:
        return int(hits[0])
    candidates = np.flatnonzero(flat > threshold)
    return int(candidates[rng.integers(candidates.size)]) if candidates.size else None


def _carve_disc(
    mask: np.ndarray, depth: np.ndarray, yy: np.ndarray, xx: np.ndarray, radius: float, rng: np.random.Generator
) -> None:
    """Remove an ellipse of about `radius` µm centred somewhere well inside the tissue."""
    idx = _random_cell_deeper_than(depth, radius + 30.0, rng)
    if idx is None:
        return
    cy, cx = yy.ravel()[idx], xx.ravel()[idx]
    ry, rx = radius * rng.uniform(0.7, 1.3), radius * rng.uniform(0.7, 1.3)
    spacing = float(yy[1, 0] - yy[0, 0])
    r0, c0 = np.unravel_index(idx, mask.shape)
    reach = int(np.ceil(max(ry, rx) / spacing)) + 1
    win = (slice(max(0, r0 - reach), r0 + reach + 1), slice(max(0, c0 - reach), c0 + reach + 1))
    mask[win] &= ((yy[win] - cy) / ry) ** 2 + ((xx[win] - cx) / rx) ** 2 > 1.0


def _carve_tear(
    mask: np.ndarray, depth: np.ndarray, yy: np.ndarray, xx: np.ndarray, short: float, rng: np.random.Generator
) -> None:
    """Remove a thin curved crack through the tissue."""
    candidates = np.flatnonzero(depth.ravel() > 60.0)
    if candidates.size == 0:
        return
    idx = candidates[rng.integers(candidates.size)]
    cy, cx = yy.ravel()[idx], xx.ravel()[idx]
    length = short * rng.uniform(0.2, 0.45)
    theta = rng.uniform(0, np.pi)
    bend = rng.uniform(-1.0, 1.0) / length
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    half_width = rng.uniform(10.0, 22.0) * (1.0 - (2.0 * u / length) ** 2).clip(0.0, 1.0) ** 0.5
    mask &= ~((np.abs(v - bend * u**2) < half_width) & (np.abs(u) < length / 2))


def _tumor_mask(
    tissue: np.ndarray, yy: np.ndarray, xx: np.ndarray, spacing: float, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Blobby tumor foci covering `fraction` of the tissue (by quantile of a focus score)."""
    depth = ndimage.distance_transform_edt(tissue) * spacing
    candidates = np.flatnonzero(depth.ravel() > 80.0)
    if candidates.size == 0:
        candidates = np.flatnonzero(tissue.ravel())
    tissue_area = tissue.sum() * spacing**2
    n_foci = int(rng.integers(1, 4))
    score = np.zeros(tissue.shape)
    for _ in range(n_foci):
        idx = candidates[rng.integers(candidates.size)]
        cy, cx = yy.ravel()[idx], xx.ravel()[idx]
        sigma = np.sqrt(fraction * tissue_area / n_foci / np.pi) * rng.uniform(0.6, 1.0)
        score += rng.uniform(0.7, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    score += 0.12 * _smooth_noise(tissue.shape, 30.0 / spacing, rng)
    threshold = np.quantile(score[tissue], 1.0 - fraction)
    return tissue & (score > threshold)


def _pen_stroke(
    tissue_sdf: np.ndarray, shape: tuple[int, int], spacing: float, rng: np.random.Generator
) -> np.ndarray | None:
    """Boolean grid of a marker stroke's centre line: an arc around the tissue or a tick over its edge."""
    offset = rng.uniform(40.0, 200.0)
    contours = measure.find_contours(tissue_sdf, -offset)
    contours = [c for c in contours if len(c) > 20]
    if not contours:
        return None
    contour = max(contours, key=len)
    if rng.random() < 0.7:  # arc around the tissue, as when circling a region
        n = len(contour)
        count = max(2, int(n * rng.uniform(0.2, 0.6)))
        if np.allclose(contour[0], contour[-1]):  # closed: the arc may wrap around
            pts = contour[(int(rng.integers(n)) + np.arange(count)) % n]
        else:  # open (cut by the slide border): stay within it
            start = int(rng.integers(n - count + 1))
            pts = contour[start : start + count]
        wobble = ndimage.gaussian_filter1d(rng.standard_normal((len(pts), 2)), sigma=max(2.0, len(pts) / 12), axis=0)
        pts = pts + wobble * (25.0 / spacing) / max(float(wobble.std()), 1e-9)
    else:  # short straight tick crossing the tissue edge
        p = contour[int(rng.integers(len(contour)))]
        theta = rng.uniform(0, 2 * np.pi)
        half = rng.uniform(150.0, 400.0) / spacing
        t = np.linspace(-half, half, int(4 * half) + 2)[:, None]
        pts = p[None, :] + t * np.array([np.sin(theta), np.cos(theta)])[None, :]
    # densify to half-cell steps and rasterise
    seg = np.diff(pts, axis=0)
    steps = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) * 2).astype(int))
    dense = np.concatenate(
        [pts[i] + np.linspace(0, 1, s, endpoint=False)[:, None] * seg[i] for i, s in enumerate(steps)] + [pts[-1:]]
    )
    rows = np.round(dense[:, 0]).astype(int)
    cols = np.round(dense[:, 1]).astype(int)
    keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    if not keep.any():
        return None
    line = np.zeros(shape, dtype=bool)
    line[rows[keep], cols[keep]] = True
    return line


def grid_spacing(width_um: float, height_um: float) -> float:
    """Node spacing of the coarse fields: 8 µm, coarser for very large slides (≤ 2048 nodes a side)."""
    return max(8.0, max(width_um, height_um) / 2048.0)


def build_fields(
    width_um: float,
    height_um: float,
    rng: np.random.Generator,
    tumor_fraction: float | None = None,
    pen: bool = False,
    holes: bool = False,
) -> SlideFields:
    """Draw one slide's coarse fields; `tumor_fraction` (of the tissue area) None makes a normal slide."""
    spacing = grid_spacing(width_um, height_um)
    ny = int(np.ceil(height_um / spacing)) + 2
    nx = int(np.ceil(width_um / spacing)) + 2
    yy, xx = np.meshgrid(np.arange(ny) * spacing, np.arange(nx) * spacing, indexing="ij")
    tissue = _tissue_mask(yy, xx, width_um, height_um, spacing, holes, rng)
    tissue_sdf = _signed_distance(tissue, spacing)
    gain = (1.0 + 0.08 * _smooth_noise((ny, nx), 150.0 / spacing, rng)).astype(np.float32)
    orientation = (0.5 + 0.5 * np.tanh(2.5 * _smooth_noise((ny, nx), 50.0 / spacing, rng))).astype(np.float32)

    tumor_sdf = None
    if tumor_fraction is not None:
        tumor = _tumor_mask(tissue_sdf > 0, yy, xx, spacing, tumor_fraction, rng)
        tumor_sdf = _signed_distance(tumor, spacing)

    ink_sdf = None
    ink_od = (0.0, 0.0, 0.0)
    colour = None
    if pen:
        line = _pen_stroke(tissue_sdf, (ny, nx), spacing, rng)
        if line is not None:
            half_width = rng.uniform(15.0, 40.0)
            ink_sdf = (half_width - ndimage.distance_transform_edt(~line) * spacing).astype(np.float32)
            colour = str(rng.choice(list(INK_COLOURS)))
            strength = rng.uniform(0.8, 1.4)
            ink_od = tuple(float(v * strength) for v in INK_COLOURS[colour])  # type: ignore[assignment]
    return SlideFields(
        width_um=width_um,
        height_um=height_um,
        spacing_um=spacing,
        tissue_sdf=tissue_sdf,
        gain=gain,
        orientation=orientation,
        tumor_sdf=tumor_sdf,
        ink_sdf=ink_sdf,
        ink_od=ink_od,
        ink_colour=colour,
    )


def _mask_at(sdf: np.ndarray, spacing: float, width_um: float, height_um: float, mpp: float) -> np.ndarray:
    width = max(1, int(np.ceil(width_um / mpp)))
    height = max(1, int(np.ceil(height_um / mpp)))
    return sample_field(sdf, spacing, Axis.make(0, height, mpp), Axis.make(0, width, mpp)) > 0


def tissue_mask(fields: SlideFields, mpp: float) -> np.ndarray:
    """Boolean tissue mask at `mpp` µm/px covering the whole slide (ceil of size / mpp pixels)."""
    return _mask_at(fields.tissue_sdf, fields.spacing_um, fields.width_um, fields.height_um, mpp)


def tumor_mask(fields: SlideFields, mpp: float) -> np.ndarray:
    """Ground-truth boolean tumor mask at `mpp` µm/px (tumor ∩ tissue; all False for a normal slide)."""
    tissue = tissue_mask(fields, mpp)
    if fields.tumor_sdf is None:
        return np.zeros_like(tissue)
    tumor = _mask_at(fields.tumor_sdf, fields.spacing_um, fields.width_um, fields.height_um, mpp)
    return tumor & tissue
