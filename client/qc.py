"""Quality-control image per slide: thumbnail, tissue contour, kept patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from fedslide.client.slides import SlideReader
from fedslide.client.tiling import PairedGrid
from fedslide.common.atomic import atomic_path

TISSUE_COLOUR = (0, 170, 0)
LOW_COLOUR = (30, 60, 220)
HIGH_COLOUR = (255, 150, 0)


QC_LONG_SIDE = 1200


def render_qc_image(
    thumb: np.ndarray, thumb_mpp: tuple[float, float], tissue: np.ndarray, grid: PairedGrid, slide_mpp: float
) -> Image.Image:
    """Thumbnail with the tissue contour (green), kept high patches (orange tint) and low patches (blue boxes).

    `tissue` may be on a coarser grid than `thumb`; it is resized onto it.
    """
    base = thumb.copy()
    if tissue.shape != base.shape[:2]:
        resized = Image.fromarray(tissue.astype(np.uint8) * 255).resize(base.shape[1::-1], Image.Resampling.NEAREST)
        tissue = np.asarray(resized) > 0
    scale_x, scale_y = slide_mpp / thumb_mpp[0], slide_mpp / thumb_mpp[1]
    tint = np.zeros(base.shape[:2], dtype=bool)
    hs = grid.high_size_level0
    for x, y in grid.high_coords:
        tint[
            int(y * scale_y) : int(np.ceil((y + hs) * scale_y)), int(x * scale_x) : int(np.ceil((x + hs) * scale_x))
        ] = True
    base[tint] = (0.7 * base[tint] + 0.3 * np.array(HIGH_COLOUR)).astype(np.uint8)
    edge = find_boundaries(tissue, mode="inner")
    edge = edge | np.roll(edge, 1, axis=0) | np.roll(edge, 1, axis=1)  # 2 px wide
    base[edge] = TISSUE_COLOUR
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    ls = grid.low_size_level0
    for x, y in grid.low_coords:
        draw.rectangle([x * scale_x, y * scale_y, (x + ls) * scale_x - 1, (y + ls) * scale_y - 1], outline=LOW_COLOUR)
    return image


def write_qc_image(path: Path, slide: SlideReader, tissue: np.ndarray, grid: PairedGrid) -> Path:
    """Render the QC image on a thumbnail of up to QC_LONG_SIDE px and write the PNG atomically."""
    width, height = slide.dimensions
    qc_mpp = max(slide.mpp, max(width, height) * slide.mpp / QC_LONG_SIDE)
    thumb, thumb_mpp = slide.thumbnail(qc_mpp)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        render_qc_image(thumb, thumb_mpp, tissue, grid, slide.mpp).save(tmp, format="PNG")
    return path
