"""Shared fixtures: the real slide shipped in tests/data/real and a generated slide without resolution metadata."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from fedslide.client.encoders.base import PatchEncoder
from fedslide.client.encoders.registry import build_encoder
from fedslide.client.synth.slide import make_slide_model
from fedslide.client.synth.tissue_render import render_region
from fedslide.common.config.preprocess import EncoderConfig

REAL = Path(__file__).resolve().parent / "data" / "real"
REAL_SHA256 = {"CMU-1-Small-Region.svs": "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"}

# the generated no-mpp slide: level 0 and level 1 sizes; OpenSlide's level-1 downsample is their mean ratio
NOMPP_LEVELS = ((2001, 1601), (1000, 800))
NOMPP_DOWNSAMPLE = (2001 / 1000 + 1601 / 800) / 2  # 2.001125: slightly above 2, like real scanners' pyramids


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    """Two cores here: keep torch from oversubscribing them."""
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """tests/data/real, after checking each shipped slide against its sha256 (a missing slide fails, never skips)."""
    for name, digest in REAL_SHA256.items():
        path = REAL / name
        if not path.is_file():
            pytest.fail(f"test slide {path} is missing (see tests/data/real/SOURCE.md)")
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != digest:
            pytest.fail(f"test slide {path} has sha256 {got}, expected {digest} (see tests/data/real/SOURCE.md)")
    return REAL


@pytest.fixture(scope="session")
def nompp_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-level tiled TIFF of synthetic tissue with no mpp, objective power or resolution unit.

    Stands in for the TCGA slide not shipped (tests/data/real/SOURCE.md): OpenSlide reads it as
    'generic-tiff' with no resolution, and level 1's downsample is NOMPP_DOWNSAMPLE.
    """
    path = tmp_path_factory.mktemp("nompp") / "no-mpp.tif"
    (w0, h0), _ = NOMPP_LEVELS
    model = make_slide_model(w0 * 0.5, h0 * 0.5, seed=7395)  # rendered as if at 0.5 µm/px; nothing records it
    with tifffile.TiffWriter(path) as tw:
        for level, ((w, h), mpp) in enumerate(zip(NOMPP_LEVELS, (0.5, 0.5 * NOMPP_DOWNSAMPLE))):
            pixels = np.ascontiguousarray(render_region(model, mpp, 0, 0, w, h))
            tw.write(
                pixels,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                resolutionunit="NONE",
                subfiletype=1 if level else 0,
                description="fedslide no-mpp test slide",
                metadata=None,
            )
    return path


@pytest.fixture(scope="module")
def two_threads() -> Iterator[None]:
    """torch on two threads for a module's encoder tests (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def effnet() -> PatchEncoder:
    """The packaged EfficientNet-Lite0 encoder (built once per module)."""
    return build_encoder(EncoderConfig())
