"""The synthesizer's streamed (tile-by-tile) slide writer against whole levels rendered and written in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from fedslide.client.synth.slide import level0_size, make_slide_model, write_slide, write_slide_model
from fedslide.client.synth.tiff_writer import default_downsamples, level_dimensions
from fedslide.client.synth.tissue_render import render_region


def _write_in_memory(path: Path, levels: list[np.ndarray], tile: int) -> None:
    """The reference: every level rendered whole, then written by tifffile from the full array."""
    with tifffile.TiffWriter(path) as tw:
        for level, pixels in enumerate(levels):
            tw.write(pixels, tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=int(level > 0))


def _pages(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return [page.asarray() for page in tf.pages]


def test_streamed_writer_gives_the_in_memory_pixels_on_every_level(tmp_path: Path) -> None:
    """Odd level sizes (edge tiles), an explicit 4-level pyramid, tiles of 128 px: same pixels as whole levels."""
    mpp, width, height, tile, downsamples = 0.5, 700, 530, 128, [1, 2, 4, 8]
    model = make_slide_model(width * mpp, height * mpp, seed=17, tumor=True, tumor_fraction=0.4)
    streamed = write_slide_model(
        tmp_path / "streamed.tif",
        model,
        mpp,
        "generic",
        width=width,
        height=height,
        downsamples=downsamples,
        tile=tile,
    )
    dims = level_dimensions(width, height, downsamples)
    whole = [render_region(model, mpp * d, 0, 0, w, h) for d, (w, h) in zip(downsamples, dims)]
    _write_in_memory(tmp_path / "in_memory.tif", whole, tile)

    got, ref = _pages(streamed), _pages(tmp_path / "in_memory.tif")
    assert len(got) == len(ref) == len(downsamples)
    for level, (a, b, w) in enumerate(zip(got, ref, whole)):
        assert a.shape == (dims[level][1], dims[level][0], 3)
        assert np.array_equal(a, b), f"level {level} differs from the in-memory write"
        assert np.array_equal(a, w)
    assert got[0].std() > 5  # tissue, not a blank slide
    with openslide.OpenSlide(str(streamed)) as slide:
        assert slide.level_count == len(downsamples)
        assert [tuple(d) for d in slide.level_dimensions] == dims
        assert [round(d) for d in slide.level_downsamples] == downsamples
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)


def test_default_pyramid_reaches_a_small_top_level(tmp_path: Path) -> None:
    """write_slide's default pyramid: ×2 levels until the top is at most 1024 px, every one readable by OpenSlide."""
    mpp = 2.0  # a 2,400-µm slide at 2 µm/px: 1,200 px, so at least one reduced level is needed
    path = write_slide(tmp_path / "s.tif", 2400.0, 1600.0, mpp, "generic", seed=3)
    width, height = level0_size(2400.0, 1600.0, mpp, "generic")
    expected = default_downsamples("generic", width, height)
    assert expected == [1, 2]
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions[0] == (width, height)
        assert [round(d) for d in slide.level_downsamples] == expected
        assert max(slide.level_dimensions[-1]) <= 1024
