"""Tissue segmentation on a thumbnail: saturation + Otsu, pen-mark removal, morphology, holes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import color, filters, morphology

from fedslide.common.config.preprocess import TissueConfig


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black marker ink (H&E is never greener than red; dense nuclei are not grey)."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    coloured_ink = (g > r + 15) & (np.maximum(g, b) - r > 30)
    darkest, brightest = rgb.min(axis=-1).astype(np.int16), rgb.max(axis=-1).astype(np.int16)
    black_ink = (brightest < 70) & (brightest - darkest < 25)
    return coloured_ink | black_ink


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1], bit-identical to `skimage.color.rgb2hsv(rgb)[..., 1]`; for uint8 images it skips
    the hue and float copies of the whole image (≈ 8× less CPU on a 30,000-px slide's thumbnail)."""
    if rgb.dtype != np.uint8:
        return color.rgb2hsv(rgb)[..., 1]
    scale = 1.0 / 255  # skimage's uint8 -> float64 conversion multiplies by 1/255
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # pairwise max/min: faster than reducing the short last axis
    value = np.multiply(np.maximum(np.maximum(r, g), b), scale, dtype=np.float64)
    delta = value - np.multiply(np.minimum(np.minimum(r, g), b), scale, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        saturation = delta / value
    saturation[delta == 0.0] = 0.0
    return saturation


def segment_tissue(rgb: np.ndarray, mpp: float, cfg: TissueConfig) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are `mpp` µm wide."""
    saturation = hsv_saturation(rgb) * 255.0
    ink = pen_mask(rgb) if cfg.remove_pen else np.zeros(rgb.shape[:2], dtype=bool)
    candidates = saturation[~ink]
    if candidates.size == 0 or candidates.max() - candidates.min() < 1e-6:
        threshold = float(cfg.min_saturation)
    else:
        threshold = max(float(filters.threshold_otsu(candidates)), float(cfg.min_saturation))
    mask = (saturation > threshold) & ~ink
    radius = max(1, round(cfg.close_um / mpp))
    mask = ndimage.binary_closing(mask, structure=morphology.disk(radius))
    if cfg.remove_pen and ink.any():
        mask &= ~ndimage.binary_dilation(ink, structure=morphology.disk(max(1, radius // 2)))
    px_area = mpp * mpp
    mask = morphology.remove_small_holes(mask, max_size=max(1, round(cfg.max_hole_area_um2 / px_area)))
    mask = morphology.remove_small_objects(mask, max_size=max(0, round(cfg.min_tissue_area_um2 / px_area) - 1))
    return mask


def box_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box [x0, y0, x1, y1] (mask px, floats) covered by True pixels; outside the mask counts as False."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.float64)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    h, w = mask.shape
    x0 = np.floor(boxes[:, 0]).astype(np.int64)
    y0 = np.floor(boxes[:, 1]).astype(np.int64)
    x1 = np.maximum(np.ceil(boxes[:, 2]).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.ceil(boxes[:, 3]).astype(np.int64), y0 + 1)
    area = (x1 - x0) * (y1 - y0)
    cx0, cx1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    cy0, cy1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    return inside / area
