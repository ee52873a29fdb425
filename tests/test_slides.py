"""Slide reading by resolution: mpp, objective power, overrides, level choice and resampling."""

from pathlib import Path

import numpy as np
import pytest

from fedslide.client.slides import MissingResolutionError, SlideError, SlideReader, resolution_from_properties


def test_resolution_prefers_mpp_then_objective_power_then_override() -> None:
    assert resolution_from_properties({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, "a").mpp == 0.25
    res = resolution_from_properties({"openslide.objective-power": "20"}, "b")
    assert res.mpp == pytest.approx(0.5) and res.source == "objective-power"
    res = resolution_from_properties({}, "c", mpp_override=0.26)
    assert res.mpp == 0.26 and res.source == "override"
    assert resolution_from_properties({"openslide.mpp-x": "0.5"}, "d", mpp_override=0.26).source == "mpp"


def test_missing_resolution_names_slide_and_option() -> None:
    with pytest.raises(MissingResolutionError) as err:
        resolution_from_properties({"openslide.vendor": "generic-tiff"}, "slide-x.tif")
    assert "slide-x.tif" in str(err.value) and "--mpp" in str(err.value) and "slide.mpp-override" in str(err.value)


def test_real_cmu_slide_single_level_at_0499(real_dir: Path) -> None:
    with SlideReader(real_dir / "CMU-1-Small-Region.svs") as s:
        assert s.mpp == pytest.approx(0.499) and s.resolution.source == "mpp"
        assert s.best_level(0.5) == 0 and s.best_level(2.0) == 0  # only one level: resample from it
        patch = s.read_region(0, 0, 2.0, 256)
        assert patch.shape == (256, 256, 3) and patch.dtype == np.uint8
        assert s.level0_size(256, 2.0) == pytest.approx(1026.05, rel=1e-3)


def test_slide_without_resolution_needs_an_override(nompp_slide: Path) -> None:
    with pytest.raises(MissingResolutionError, match="no-mpp.tif"):
        SlideReader(nompp_slide)
    with SlideReader(nompp_slide, mpp_override=0.5) as s:
        assert s.level_mpps == pytest.approx([0.5, 1.0005625], rel=1e-6)  # level-1 downsample 2.001125
        assert s.best_level(1.0) == 1  # within tolerance of 1.0
        assert s.best_level(0.9) == 0
        patch = s.read_region(1000, 1000, 1.0, 128)  # tissue there
        assert patch.shape == (128, 128, 3) and patch.std() > 5


def test_non_slide_file_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "notes.svs"
    fake.write_text("this is not a slide")
    with pytest.raises(SlideError, match="notes.svs"):
        SlideReader(fake)
