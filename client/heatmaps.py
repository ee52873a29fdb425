"""Attention heatmaps: per-instance scores drawn as cells over a slide thumbnail, with a colour bar and legend.

An instance is a square of the slide (a low-res patch, one of its 4 × 4 child slots, or a high-res
patch) given by its level-0 top-left corner and side. Scores are rasterised at instance resolution
and shown over the thumbnail at 1:1 thumbnail pixels, so the PNG's layout is fixed by the thumbnail's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from fedslide.common.atomic import atomic_path

DPI = 100
CMAP = "turbo"
ALPHA = 0.55
TISSUE_COLOUR = "#00e000"
REGION_COLOUR = "white"
_MARGIN = 12
_TITLE = 84
_COLORBAR = 18
_COLORBAR_LABEL = 76
_MIN_WIDTH = 560


@dataclass(frozen=True)
class InstanceMap:
    """Scores of square slide cells: `coords` [M, 2] level-0 top-left (x, y), side `size_level0`, `values` [M]."""

    coords: np.ndarray
    size_level0: float
    values: np.ndarray

    def __post_init__(self) -> None:
        if self.coords.shape != (len(self.values), 2):
            raise ValueError(f"coords must be [{len(self.values)}, 2], got {self.coords.shape}")
        if self.size_level0 <= 0:
            raise ValueError(f"cell side must be positive, got {self.size_level0}")


def instance_raster(instances: InstanceMap, dims0: tuple[int, int]) -> np.ndarray:
    """Scores on a grid of cells of the instance side covering a slide of level-0 (width, height); NaN = no instance.

    Cell (row, col) covers level-0 [col·s, (col+1)·s) × [row·s, (row+1)·s), s = instance side.
    """
    s = float(instances.size_level0)
    cols = max(1, int(np.ceil(dims0[0] / s - 1e-6)))
    rows = max(1, int(np.ceil(dims0[1] / s - 1e-6)))
    raster = np.full((rows, cols), np.nan, dtype=np.float64)
    if len(instances.values) == 0:
        return raster
    ix = np.rint(instances.coords[:, 0] / s).astype(np.int64)
    iy = np.rint(instances.coords[:, 1] / s).astype(np.int64)
    inside = (ix >= 0) & (iy >= 0) & (ix < cols) & (iy < rows)
    raster[iy[inside], ix[inside]] = np.asarray(instances.values, dtype=np.float64)[inside]
    return raster


@dataclass(frozen=True)
class HeatmapLayout:
    """Pixel layout of a heatmap PNG: figure size and where the slide image sits (left, top, width, height)."""

    width: int
    height: int
    image_box: tuple[int, int, int, int]
    colorbar_box: tuple[int, int, int, int]


def heatmap_layout(thumb_width: int, thumb_height: int) -> HeatmapLayout:
    """The fixed layout for a thumbnail of the given size (title band above, colour bar right of the image)."""
    image = (_MARGIN, _TITLE, thumb_width, thumb_height)
    colorbar = (_MARGIN + thumb_width + _MARGIN, _TITLE, _COLORBAR, thumb_height)
    width = max(_MIN_WIDTH, colorbar[0] + _COLORBAR + _COLORBAR_LABEL)
    return HeatmapLayout(width=width, height=_TITLE + thumb_height + _MARGIN, image_box=image, colorbar_box=colorbar)


def _axes_rect(box: tuple[int, int, int, int], layout: HeatmapLayout) -> tuple[float, float, float, float]:
    left, top, w, h = box
    return (left / layout.width, 1.0 - (top + h) / layout.height, w / layout.width, h / layout.height)


def render_heatmap(
    thumb: np.ndarray,
    thumb_mpp: tuple[float, float],
    slide_mpp: float,
    dims0: tuple[int, int],
    instances: InstanceMap,
    *,
    title: str,
    subtitle: str = "",
    colorbar_label: str = "attention × instances (1 = uniform)",
    tissue: np.ndarray | None = None,
    tissue_mpp: tuple[float, float] | None = None,
    regions: list[tuple[float, float, float]] | None = None,
) -> Figure:
    """A figure: `thumb` at 1:1, instance scores in colour over it, the tissue outline, optional boxes.

    `regions` are level-0 squares (x, y, side) outlined in white (e.g. the regions zoomed into).
    """
    th, tw = thumb.shape[:2]
    layout = heatmap_layout(tw, th)
    fig = Figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI)
    ax = fig.add_axes(_axes_rect(layout.image_box, layout))
    ax.imshow(thumb, extent=(0, tw, th, 0), interpolation="nearest")
    sx, sy = slide_mpp / thumb_mpp[0], slide_mpp / thumb_mpp[1]  # thumbnail px per level-0 px
    raster = instance_raster(instances, dims0)
    s = instances.size_level0
    finite = raster[np.isfinite(raster)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-12:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(
        np.ma.masked_invalid(raster),
        cmap=CMAP,
        vmin=vmin,
        vmax=vmax,
        alpha=ALPHA,
        extent=(0, raster.shape[1] * s * sx, raster.shape[0] * s * sy, 0),
        interpolation="nearest",
    )
    handles: list = []
    if tissue is not None and tissue.any():
        mx, my = tissue_mpp if tissue_mpp is not None else thumb_mpp
        xs = (np.arange(tissue.shape[1]) + 0.5) * mx / thumb_mpp[0]
        ys = (np.arange(tissue.shape[0]) + 0.5) * my / thumb_mpp[1]
        ax.contour(xs, ys, tissue.astype(np.float32), levels=[0.5], colors=[TISSUE_COLOUR], linewidths=1.2)
        handles.append(Line2D([], [], color=TISSUE_COLOUR, lw=1.5, label="tissue outline"))
    outlined: list[patheffects.AbstractPathEffect] = [patheffects.withStroke(linewidth=3.0, foreground="black")]
    for x, y, side in regions or []:
        box = Rectangle((x * sx, y * sy), side * sx, side * sy, fill=False, ec=REGION_COLOUR, lw=1.4, ls="--")
        box.set_path_effects(outlined)
        ax.add_patch(box)
    if regions:
        label = f"zoomed regions ({len(regions)})"
        handle = Patch(facecolor="none", edgecolor=REGION_COLOUR, ls="--", lw=1.4, label=label)
        handle.set_path_effects(outlined)
        handles.append(handle)
    ax.set_xlim(0, tw)
    ax.set_ylim(th, 0)
    ax.set_axis_off()
    cax = fig.add_axes(_axes_rect(layout.colorbar_box, layout))
    fig.colorbar(im, cax=cax).set_label(colorbar_label, fontsize=8)
    cax.tick_params(labelsize=7)
    fig.text(_MARGIN / layout.width, 1.0 - 6 / layout.height, title, ha="left", va="top", fontsize=11, weight="bold")
    if subtitle:
        fig.text(_MARGIN / layout.width, 1.0 - 28 / layout.height, subtitle, ha="left", va="top", fontsize=8)
    if handles:
        fig.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(_MARGIN / layout.width, 1.0 - 48 / layout.height),
            ncol=len(handles),
            fontsize=7,
            frameon=False,
            borderaxespad=0.0,
            borderpad=0.0,
        )
    return fig


def write_heatmap(path: Path, figure: Figure) -> Path:
    """Save a heatmap figure as PNG atomically (size exactly the layout's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=DPI, format="png")
    return path


def figure_to_array(figure: Figure) -> np.ndarray:
    """The figure rendered to an RGB uint8 array [height, width, 3]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
