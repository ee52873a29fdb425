"""Tissue segmentation on thumbnails and the paired grid geometry (parents, children, coordinates)."""

import numpy as np
import pytest
from skimage.draw import disk, line

from fedslide.client.tiling import paired_grid
from fedslide.client.tissue import box_fractions, pen_mask, segment_tissue
from fedslide.common.config.preprocess import TilingConfig, TissueConfig

PINK = (230, 150, 200)
BLUE_INK = (40, 90, 200)


def _thumb() -> np.ndarray:
    img = np.full((200, 300, 3), 245, np.uint8)
    rr, cc = disk((100, 100), 60)
    img[rr, cc] = PINK
    rr, cc = disk((100, 75), 3)  # a small hole: filled
    img[rr, cc] = 245
    rr, cc = disk((100, 125), 15)  # a large hole: kept
    img[rr, cc] = 245
    for d in range(-4, 5):  # a pen stroke on the background and across the tissue edge
        rr, cc = line(20 + d, 180, 180 + d, 280)
        img[rr, cc] = BLUE_INK
    return img


def test_tissue_mask_keeps_tissue_drops_pen_and_fills_small_holes() -> None:
    mask = segment_tissue(_thumb(), mpp=8.0, cfg=TissueConfig())
    assert mask[100, 60]  # tissue
    assert mask[100, 75]  # small hole filled
    assert not mask[100, 125]  # large hole kept
    assert not mask[10, 10]  # background
    assert not mask[100, 230]  # pen stroke on background
    assert pen_mask(_thumb())[100, 230]
    assert not pen_mask(np.array([[PINK]], np.uint8))[0, 0]


def test_pen_removal_can_be_switched_off() -> None:
    mask = segment_tissue(_thumb(), mpp=8.0, cfg=TissueConfig(remove_pen=False))
    assert mask[100, 230]


def test_blank_thumbnail_has_no_tissue() -> None:
    assert not segment_tissue(np.full((64, 64, 3), 240, np.uint8), 8.0, TissueConfig()).any()


def test_box_fractions_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) > 0.5
    boxes = np.array([[0, 0, 10, 10], [5.5, 3.2, 17.9, 20.1], [45, 35, 60, 60]], float)
    got = box_fractions(mask, boxes)
    padded = np.zeros((80, 80), bool)
    padded[:40, :50] = mask  # outside the mask counts as background
    for (x0, y0, x1, y1), g in zip(boxes, got):
        sub = padded[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))]
        assert g == pytest.approx(sub.mean())
    assert got[2] < 0.25


@pytest.mark.parametrize("slide_mpp,low0,high0", [(0.25, 2048, 512), (0.5, 1024, 256), (0.499, 1026.05, 256.51)])
def test_grid_geometry_parents_and_children(slide_mpp: float, low0: float, high0: float) -> None:
    width0, height0 = int(3.1 * low0), int(2.5 * low0)
    tissue = np.ones((100, 100), bool)
    mask_mpp = (width0 * slide_mpp / 100, height0 * slide_mpp / 100)
    g = paired_grid(
        width0, height0, slide_mpp, TilingConfig(min_tissue_low=0.01, min_tissue_high=0.01), tissue, mask_mpp
    )
    assert g.ratio == 4
    assert g.low_size_level0 == pytest.approx(low0, rel=1e-3) and g.high_size_level0 == pytest.approx(high0, rel=1e-3)
    assert len(g.low_coords) == 4 * 3  # the grid covers the slide; edge patches reach past it
    # high patches entirely past the slide edge have no tissue and are dropped; the others are kept
    inside = [(c * high0 < width0) and (r * high0 < height0) for r in range(12) for c in range(16)]
    assert len(g.high_coords) == sum(inside)
    assert (np.diff(g.high_parent) >= 0).all()  # grouped by parent
    for h in range(len(g.high_coords)):
        p = g.high_parent[h]
        row, col = divmod(int(g.high_child[h]), 4)
        expect = g.low_coords[p] + np.array([col, row]) * g.high_size_level0
        assert np.abs(g.high_coords[h] - expect).max() <= 1.0
    assert list(g.children_of(2)) == list(range(32, 48))


def test_tissue_thresholds_select_patches() -> None:
    slide_mpp, width0, height0 = 0.5, 4096, 4096  # 4 x 4 low patches of 512 µm
    tissue = np.zeros((256, 256), bool)  # 8 µm/px
    tissue[:, :64] = True  # first low column entirely tissue
    tissue[:16, 64:80] = True  # one high patch worth of tissue in low patch (row 0, col 1)
    mask_mpp = (8.0, 8.0)
    g = paired_grid(
        width0, height0, slide_mpp, TilingConfig(min_tissue_low=0.05, min_tissue_high=0.5), tissue, mask_mpp
    )
    assert sorted(map(tuple, g.low_coords)) == [(0, 0), (0, 1024), (0, 2048), (0, 3072), (1024, 0)]
    parent_of_corner = [i for i, c in enumerate(g.low_coords) if tuple(c) == (1024, 0)][0]
    kids = g.children_of(parent_of_corner)
    assert len(kids) == 1 and tuple(g.high_coords[kids[0]]) == (1024, 0)
    strict = paired_grid(width0, height0, slide_mpp, TilingConfig(min_tissue_low=0.5), tissue, mask_mpp)
    assert len(strict.low_coords) == 4


def test_dense_purple_nuclei_are_not_black_ink() -> None:
    pixels = np.array([[[50, 18, 57], [111, 80, 115], [30, 30, 35], [20, 60, 40]]], np.uint8)
    assert pen_mask(pixels).tolist() == [[False, False, True, True]]
