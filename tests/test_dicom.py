"""DICOM WSI: slides converted here with wsidicomizer read, tile and preprocess like their source files."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from wsidicom.codec import JpegSettings
from wsidicom.codec.settings import Subsampling
from wsidicomizer import WsiDicomizer
from wsidicomizer.wsidicomizer import SourceIdentifier

from fedslide.client.inference.model import load_bundle
from fedslide.client.slides import SlideError, SlideReader, discover_slides, slide_id_of
from fedslide.client.synth.slide import write_slide
from fedslide.client.tiling import paired_grid
from fedslide.client.tissue import segment_tissue
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.data import load_sites
from fedslide.common.distillation.pipeline import bundle_meta
from fedslide.common.features import feature_path, is_complete, read_feature_file
from fedslide.common.models.registry import build_model
from fedslide.deploy.cli import main

ENC = "efficientnet_lite0"
# wsidicomizer re-encodes every tile as JPEG (its OpenSlide source decodes the source first; quality 95, no chroma
# subsampling, as scanners write), so pixels differ from the source by JPEG error: per-channel |Δ| (0-255) on the
# same patch read at the same µm/px stays below these (mean, 99th percentile)
JPEG_QUALITY = 95
PIXEL_MEAN_ABS_TOL = 2.5
PIXEL_P99_ABS_TOL = 12.0


def dicomize(source: Path, folder: Path) -> Path:
    """Convert `source` into a folder of DICOM instances (pyramid levels as stored; no label or overview).

    The OpenSlide source is chosen because opentile, wsidicomizer's default for SVS, needs the libturbojpeg system
    library, which is not installed here.
    """
    WsiDicomizer.convert(
        source,
        folder,
        include_label=False,
        include_overview=False,
        workers=1,
        preferred_source=SourceIdentifier.OPENSLIDE,
        encoding=JpegSettings(quality=JPEG_QUALITY, subsampling=Subsampling.R444),
    )
    assert len(list(folder.glob("*.dcm"))) >= 1
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic 20× generic-TIFF slide (pyramid 1, 2, 4, 8) and its DICOM conversion `synth_dcm/`."""
    root = tmp_path_factory.mktemp("dicom_synth")
    src = write_slide(
        root / "synth.tif", 1024, 1024, 0.5, "generic", seed=7, tumor=True, tumor_fraction=0.4, downsamples=[1, 2, 4, 8]
    )
    return src, dicomize(src, root / "synth_dcm")


@pytest.fixture(scope="module")
def cmu_pair(real_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real CMU-1-Small-Region.svs and its DICOM conversion `CMU-1-Small-Region/`."""
    root = tmp_path_factory.mktemp("dicom_cmu")
    src = real_dir / "CMU-1-Small-Region.svs"
    return src, dicomize(src, root / "CMU-1-Small-Region")


@pytest.mark.parametrize("which", ["pair", "cmu_pair"])
def test_openslide_opens_the_folder_with_the_source_geometry_and_mpp(
    which: str, request: pytest.FixtureRequest
) -> None:
    src, folder = request.getfixturevalue(which)
    with SlideReader(src) as s, SlideReader(folder) as d:
        assert d.vendor == "dicom" and d.slide_id == folder.name
        assert d.resolution.source == "mpp"  # from the DICOM pixel spacing, exposed as openslide.mpp-x/-y
        assert d.mpp == pytest.approx(s.mpp, rel=1e-3)
        assert d.dimensions == s.dimensions
        assert d.level_mpps == pytest.approx(s.level_mpps, rel=1e-3)
        for target in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
            assert d.best_level(target) == s.best_level(target), target


def test_level_choice_by_mpp_uses_the_stored_dicom_levels(pair: tuple[Path, Path]) -> None:
    _, folder = pair
    with SlideReader(folder) as d:
        assert len(d.level_mpps) == 4 and d.level_mpps == pytest.approx([0.5, 1.0, 2.0, 4.0], rel=1e-3)
        assert d.best_level(0.5) == 0 and d.best_level(2.0) == 2 and d.best_level(3.0) == 2
        assert d.best_level(0.25) == 0  # finer than level 0: level 0, upsampled


def test_one_instance_file_opens_the_same_slide(pair: tuple[Path, Path]) -> None:
    _, folder = pair
    with SlideReader(folder) as d, SlideReader(sorted(folder.glob("*.dcm"))[-1]) as one:
        assert one.dimensions == d.dimensions and one.level_mpps == pytest.approx(d.level_mpps)


@pytest.mark.parametrize("which", ["pair", "cmu_pair"])
def test_tiling_of_the_dicom_slide_equals_the_source(which: str, request: pytest.FixtureRequest) -> None:
    """Same tissue mask (up to JPEG noise at its border), same patch grid, pixels within JPEG tolerance."""
    src, folder = request.getfixturevalue(which)
    cfg = PreprocessConfig()
    grids, patches = [], []
    for path in (src, folder):
        with SlideReader(path) as r:
            thumb, thumb_mpp = r.thumbnail(cfg.tissue.thumbnail_mpp)
            tissue = segment_tissue(thumb, float(np.mean(thumb_mpp)), cfg.tissue)
            grid = paired_grid(*r.dimensions, r.mpp, cfg.tiling, tissue, thumb_mpp)
            grids.append(grid)
            coords = grid.low_coords[:8]
            patches.append(np.stack([r.read_region(x, y, cfg.tiling.low_mpp, 64) for x, y in coords]))
            patches.append(np.stack([r.read_region(x, y, cfg.tiling.high_mpp, 128) for x, y in grid.high_coords[:8]]))
    a, b = grids
    assert len(a.low_coords) > 0 and len(a.high_coords) > 0
    np.testing.assert_array_equal(a.low_coords, b.low_coords)
    np.testing.assert_array_equal(a.high_coords, b.high_coords)
    np.testing.assert_array_equal(a.high_parent, b.high_parent)
    for ours, ref in ((patches[2], patches[0]), (patches[3], patches[1])):
        diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
        assert diff.mean() < PIXEL_MEAN_ABS_TOL and np.percentile(diff, 99) < PIXEL_P99_ABS_TOL


def test_discovery_finds_folders_and_groups_loose_instances(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, folder = pair
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(src, slides / "a.tif")
    shutil.copytree(folder, slides / "b.dicom")
    (slides / "empty").mkdir()  # a folder without .dcm files is no slide
    loose = tmp_path / "loose"
    shutil.copytree(folder, loose)
    found = discover_slides(slides, PreprocessConfig().slide.extensions)
    assert [p.name for p in found] == ["a.tif", "b.dicom"]
    assert [slide_id_of(p) for p in found] == ["a", "b.dicom"]  # a DICOM slide's id is its whole folder name
    assert discover_slides(slides, ["tif"]) == [slides / "a.tif"]  # "dcm" not among the extensions: no DICOM
    # instances of one slide lying loose in the folder count once, as their first file
    assert discover_slides(loose, ["dcm"]) == [sorted(loose.glob("*.dcm"))[0]]


def test_a_folder_without_a_readable_wsi_fails_naming_the_folder(tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(SlideError, match=r"slide folder .*nothing: no \.dcm files"):
        SlideReader(empty)
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "x.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(SlideError, match=r"slide folder .*broken: none of its 1 \.dcm files .* \(x\.dcm: "):
        SlideReader(bad)


@pytest.mark.slow
def test_preprocess_and_predict_read_a_dicom_site(
    pair: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`fedslide preprocess` writes features for a DICOM folder equal to its source's; `predict` reads the folder."""
    src, folder = pair
    site = tmp_path / "site"
    (site / "slides").mkdir(parents=True)
    shutil.copy(src, site / "slides" / "src.tif")
    shutil.copytree(folder, site / "slides" / "dcm")
    shutil.copytree(folder, site / "slides" / "broken")
    for f in (site / "slides" / "broken").glob("*.dcm"):
        f.write_bytes(b"truncated")
    code = main(["preprocess", "--site", str(site), "--no-progress", "--batch-size", "16"])
    assert code != 0  # the broken folder is a failure, recorded; the other slides are done
    failures = list(csv.DictReader((site / "features" / ENC / "failures.csv").open()))
    assert [f["slide_id"] for f in failures] == ["broken"] and "slide folder" in failures[0]["reason"]
    for res in ("low", "high"):
        ours = read_feature_file(feature_path(site, ENC, res, "dcm"))
        ref = read_feature_file(feature_path(site, ENC, res, "src"))
        assert is_complete(ours.path) and ours.attrs["slide_id"] == "dcm"
        np.testing.assert_array_equal(ours.coords, ref.coords)
        cos = (ours.features * ref.features).sum(1) / (
            np.linalg.norm(ours.features, axis=1) * np.linalg.norm(ref.features, axis=1)
        )
        assert cos.min() > 0.98, (res, cos.min())  # JPEG q95 re-encoding: measured min 0.990
    shutil.rmtree(site / "slides" / "broken")

    (site / "labels.csv").write_text("slide_id,label,split\nsrc,tumor,train\ndcm,normal,val\n")
    data = load_sites([site], ENC)
    model_cfg = ModelConfig(in_dim=data.feature_dim, hidden_dim=8)
    bundle = tmp_path / "bundle"
    StudentBundle(bundle_meta(data, "raw", None, {}), None, build_model(model_cfg), student_config=model_cfg).save(
        bundle
    )
    assert load_bundle(bundle).meta is not None
    out = tmp_path / "pred"
    with caplog.at_level(logging.ERROR):
        code = main(["predict", "--slides", str(site / "slides"), "--model", str(bundle), "--out", str(out)])
    assert code == 0, caplog.text
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    assert set(rows) == {"src", "dcm"}
    assert float(rows["dcm"]["probability"]) == pytest.approx(float(rows["src"]["probability"]), abs=0.05)
