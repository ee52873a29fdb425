"""The tissue mask's fast HSV saturation against scikit-image's rgb2hsv."""

from __future__ import annotations

import numpy as np
from skimage import color

from fedslide.client.synth.slide import make_slide_model
from fedslide.client.synth.tissue_render import render_region
from fedslide.client.tissue import hsv_saturation


def test_saturation_is_bit_identical_to_skimage() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    noise[:4] = 0  # black: 0 / 0
    noise[4:8] = 200  # grey: delta 0
    noise[8:10, :, 0] = 255  # one saturated channel
    slide = render_region(make_slide_model(600, 600, seed=2, tumor=True), 8.0, 0, 0, 75, 75)
    for rgb in (noise, slide):
        assert np.array_equal(hsv_saturation(rgb), color.rgb2hsv(rgb)[..., 1])
    as_float = noise.astype(np.float32) / 255  # other dtypes go through skimage itself
    assert np.array_equal(hsv_saturation(as_float), color.rgb2hsv(as_float)[..., 1])
