"""Paired tiling: a low-res grid and the high-res grid nested in it (each low patch = ratio×ratio high patches)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedslide.client.tissue import box_fractions
from fedslide.common.config.preprocess import TilingConfig


@dataclass(frozen=True)
class PairedGrid:
    """Kept patches of both grids, in level-0 pixels.

    Low patches are in row-major grid order. High patches are grouped by parent (the index of
    their low patch) and, within a parent, row-major: `child` = row * ratio + col.
    """

    ratio: int
    low_coords: np.ndarray  # [L, 2] int64 level-0 top-left (x, y)
    low_size_level0: float
    low_tissue: np.ndarray  # [L] tissue fraction
    high_coords: np.ndarray  # [H, 2]
    high_size_level0: float
    high_parent: np.ndarray  # [H] index into low_coords
    high_child: np.ndarray  # [H] row * ratio + col inside the parent
    high_tissue: np.ndarray  # [H]

    def children_of(self, low_index: int) -> np.ndarray:
        """Indices (into the high arrays) of the kept children of one low patch."""
        start, stop = np.searchsorted(self.high_parent, [low_index, low_index + 1])
        return np.arange(start, stop)


def paired_grid(
    width0: int,
    height0: int,
    slide_mpp: float,
    tiling: TilingConfig,
    tissue: np.ndarray,
    mask_mpp: tuple[float, float],
) -> PairedGrid:
    """Lay both grids over a slide of level-0 size (width0, height0) and keep tissue patches.

    The low grid covers the whole slide (edge patches may reach past it; that part reads as
    white background and counts as no tissue). A low patch is kept when its tissue fraction
    is ≥ min-tissue-low; a high patch when its parent is kept and its own fraction is ≥ min-tissue-high.
    """
    r = tiling.ratio
    low_um = tiling.low_patch_size * tiling.low_mpp
    high_um = tiling.high_patch_size * tiling.high_mpp
    cols = int(np.ceil(width0 * slide_mpp / low_um - 1e-9))
    rows = int(np.ceil(height0 * slide_mpp / low_um - 1e-9))
    gy, gx = np.mgrid[0:rows, 0:cols]
    low_um_xy = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float64) * low_um
    low_frac = _fractions(low_um_xy, low_um, tissue, mask_mpp)
    keep_low = low_frac >= tiling.min_tissue_low
    low_um_xy, low_frac = low_um_xy[keep_low], low_frac[keep_low]

    ci, cj = np.divmod(np.arange(r * r), r)  # child row, col
    offsets = np.stack([cj, ci], axis=1).astype(np.float64) * high_um  # [r*r, 2]
    high_um_xy = (low_um_xy[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
    parent = np.repeat(np.arange(len(low_um_xy)), r * r)
    child = np.tile(np.arange(r * r), len(low_um_xy))
    high_frac = _fractions(high_um_xy, high_um, tissue, mask_mpp)
    keep_high = high_frac >= tiling.min_tissue_high

    to_px = 1.0 / slide_mpp
    return PairedGrid(
        ratio=r,
        low_coords=np.rint(low_um_xy * to_px).astype(np.int64).reshape(-1, 2),
        low_size_level0=low_um * to_px,
        low_tissue=low_frac,
        high_coords=np.rint(high_um_xy[keep_high] * to_px).astype(np.int64).reshape(-1, 2),
        high_size_level0=high_um * to_px,
        high_parent=parent[keep_high],
        high_child=child[keep_high],
        high_tissue=high_frac[keep_high],
    )


def _fractions(origins_um: np.ndarray, side_um: float, tissue: np.ndarray, mask_mpp: tuple[float, float]) -> np.ndarray:
    mx, my = mask_mpp
    boxes = (
        np.stack(
            [
                origins_um[:, 0] / mx,
                origins_um[:, 1] / my,
                (origins_um[:, 0] + side_um) / mx,
                (origins_um[:, 1] + side_um) / my,
            ],
            axis=1,
        )
        if len(origins_um)
        else np.zeros((0, 4))
    )
    return box_fractions(tissue, boxes)
