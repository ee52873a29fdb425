"""One synthetic slide: draw its model from a seed and stream it to a pyramidal TIFF."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fedslide.client.synth.fields import build_fields
from fedslide.client.synth.procedural import derive_key
from fedslide.client.synth.stains import Stain
from fedslide.client.synth.tiff_writer import (
    Compression,
    TiffStyle,
    count_tiles,
    default_downsamples,
    write_pyramidal_tiff,
)
from fedslide.client.synth.tissue_render import SlideModel, render_region

_MAX_ALIGN = 64


def make_slide_model(
    width_um: float,
    height_um: float,
    seed: int,
    *,
    tumor: bool = False,
    tumor_fraction: float = 0.25,
    pen: bool = False,
    holes: bool = False,
    stain: Stain | None = None,
) -> SlideModel:
    """The procedural model of a slide, a pure function of its arguments.

    `tumor_fraction` is the share of the tissue area covered by tumor (tumor slides only).
    """
    if width_um <= 0 or height_um <= 0:
        raise ValueError(f"slide size must be positive, got {width_um}x{height_um} µm")
    if tumor and not 0.0 < tumor_fraction < 1.0:
        raise ValueError(f"tumor_fraction must be in (0, 1), got {tumor_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, 1]))
    fields = build_fields(width_um, height_um, rng, tumor_fraction if tumor else None, pen=pen, holes=holes)
    return SlideModel(fields=fields, stain=stain or Stain(), seed=derive_key(seed, 2))


def level0_size(width_um: float, height_um: float, mpp: float, style: TiffStyle) -> tuple[int, int]:
    """Level-0 pixels for a physical size, rounded up so every default downsample divides them exactly."""
    width = max(1, round(width_um / mpp))
    height = max(1, round(height_um / mpp))
    align = min(default_downsamples(style, width, height)[-1], _MAX_ALIGN)
    return math.ceil(width / align) * align, math.ceil(height / align) * align


def write_slide_model(
    path: Path | str,
    model: SlideModel,
    mpp: float,
    style: TiffStyle,
    *,
    width: int | None = None,
    height: int | None = None,
    downsamples: list[int] | None = None,
    tile: int = 256,
    compression: Compression = "zlib",
    compression_level: int = 1,
    progress: bool = False,
) -> Path:
    """Render `model` at `mpp` µm/px (level 0) into a pyramidal TIFF of the given style.

    Level 0 defaults to the model's physical size / mpp; level k is rendered at mpp·downsample.
    Style 'plain' writes no resolution metadata (the mpp only sets the physical scale).
    """
    if width is None or height is None:
        width = width or max(1, round(model.width_um / mpp))
        height = height or max(1, round(model.height_um / mpp))
    downsamples = list(downsamples) if downsamples is not None else default_downsamples(style, width, height)
    levels_mpp = [mpp * d for d in downsamples]

    def tile_fn(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return render_region(model, levels_mpp[level], x, y, w, h)

    bar = None
    if progress:
        bar = tqdm(total=count_tiles(width, height, downsamples, tile), desc=Path(path).name, unit="tile", leave=False)
    try:
        return write_pyramidal_tiff(
            path,
            width,
            height,
            None if style == "plain" else mpp,
            style,
            tile_fn,
            downsamples,
            tile=tile,
            compression=compression,
            compression_level=compression_level,
            on_tile=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()


def write_slide(
    path: Path | str,
    width_um: float,
    height_um: float,
    mpp: float,
    style: TiffStyle,
    seed: int,
    *,
    tumor: bool = False,
    tumor_fraction: float = 0.25,
    pen: bool = False,
    holes: bool = False,
    stain: Stain | None = None,
    downsamples: list[int] | None = None,
    tile: int = 256,
    compression: Compression = "zlib",
    progress: bool = False,
) -> Path:
    """Draw a slide from `seed` and write it: e.g. style 'aperio' at mpp 0.25 is a 40× SVS.

    Level-0 size is width_um/mpp × height_um/mpp rounded up to a multiple of the largest default
    downsample (so level downsamples are exact). Returns the path written.
    """
    width, height = level0_size(width_um, height_um, mpp, style)
    model = make_slide_model(
        width * mpp, height * mpp, seed, tumor=tumor, tumor_fraction=tumor_fraction, pen=pen, holes=holes, stain=stain
    )
    return write_slide_model(
        path,
        model,
        mpp,
        style,
        width=width,
        height=height,
        downsamples=downsamples,
        tile=tile,
        compression=compression,
        progress=progress,
    )
