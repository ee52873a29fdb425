"""Zoom (AHDMIL pre-screening / WISE-FUSE coarse-to-fine): pick the low-res regions to read at high res, the K most
attended ones or those whose relevance passes a threshold."""

from __future__ import annotations

import numpy as np

from fedslide.client.tiling import PairedGrid


def region_scores(attention: np.ndarray, low_index: np.ndarray, num_low: int) -> np.ndarray:
    """Student attention summed per low patch [num_low] (a patch's 4×4 token instances add up)."""
    return np.bincount(low_index, weights=attention, minlength=num_low)[:num_low]


def select_regions(scores: np.ndarray, grid: PairedGrid, k: int) -> np.ndarray:
    """Indices (ascending) of the k highest-scoring low patches that have kept high children.

    k larger than the number of such patches takes them all; ties go to the lower index.
    """
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    has_children = np.bincount(grid.high_parent, minlength=len(grid.low_coords))[: len(grid.low_coords)] > 0
    candidates = np.flatnonzero(has_children)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    return np.sort(order[:k]).astype(np.int64)


def region_relevance(scores: np.ndarray) -> np.ndarray:
    """Each low patch's relevance in [0, 1]: its attention score min-max scaled over the slide (all equal: 1).

    AHDMIL's pre-screen keeps a patch when the sigmoid of its own relevance logit passes 0.5
    (github JiuyangDong/AHDMIL, models/hdmil.py `_gumbel_sigmoid(..., threshold=0.5)`); the student's attention is a
    softmax over the slide, so its scale depends on the number of patches and is put on [0, 1] per slide instead.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    low, span = scores.min(), scores.max() - scores.min()
    return np.ones_like(scores) if span <= 0 else (scores - low) / span


def select_above(scores: np.ndarray, grid: PairedGrid, threshold: float, k: int = 0) -> np.ndarray:
    """Indices (ascending) of the low patches with kept high children whose relevance (`region_relevance`) is above
    `threshold`; with k > 0 at most the k most relevant of them (ties to the lower index)."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"zoom threshold must lie in [0, 1), got {threshold}")
    relevance = region_relevance(scores)
    has_children = np.bincount(grid.high_parent, minlength=len(grid.low_coords))[: len(grid.low_coords)] > 0
    passing = np.flatnonzero(has_children & (relevance > threshold))
    if k > 0 and len(passing) > k:
        passing = passing[np.argsort(-relevance[passing], kind="stable")[:k]]
    return np.sort(passing).astype(np.int64)


def subset_grid(grid: PairedGrid, low_indices: np.ndarray) -> tuple[PairedGrid, np.ndarray]:
    """The grid restricted to some low patches and their kept children, and each kept child's index in `grid`.

    Low patches are renumbered 0..len-1 in the given (ascending) order; `parent` follows.
    """
    low_indices = np.asarray(low_indices, dtype=np.int64)
    new_index = np.full(len(grid.low_coords), -1, dtype=np.int64)
    new_index[low_indices] = np.arange(len(low_indices))
    high_keep = np.flatnonzero(new_index[grid.high_parent] >= 0) if len(grid.high_parent) else np.zeros(0, np.int64)
    sub = PairedGrid(
        ratio=grid.ratio,
        low_coords=grid.low_coords[low_indices],
        low_size_level0=grid.low_size_level0,
        low_tissue=grid.low_tissue[low_indices],
        high_coords=grid.high_coords[high_keep],
        high_size_level0=grid.high_size_level0,
        high_parent=new_index[grid.high_parent[high_keep]],
        high_child=grid.high_child[high_keep],
        high_tissue=grid.high_tissue[high_keep],
    )
    return sub, high_keep
