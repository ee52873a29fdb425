"""QuPath GeoJSON export: geometry validity, the fields QuPath's import reads, level-0 coordinates, CLI entry points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import shape

from fedslide.client.encoders import PatchEncoder
from fedslide.client.inference import predict_slides
from fedslide.client.inference.qupath import (
    ATTENTION,
    OVERLAY_DIR,
    QUPATH_DIR,
    TUMOUR_PROBABILITY,
    QupathExportError,
    SlideOverlay,
    instance_probabilities,
    tissue_polygons,
    tumour_class_index,
    tumour_regions,
)
from fedslide.client.predict_cli import add_parser as add_predict
from fedslide.client.qupath_cli import add_parser as add_export
from fedslide.client.slides import SlideReader
from fedslide.client.tiling import paired_grid
from fedslide.client.tissue import segment_tissue
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.predict import PredictConfig, QupathConfig
from fedslide.common.config.preprocess import SlideConfig, TilingConfig, TissueConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.models.registry import build_model

from tests.feature_sites import tiny_student_bundle

CLASSES = ["normal", "tumor"]
SLIDE = "CMU-1-Small-Region"
OBJECT_TYPES = {"annotation", "tile", "detection"}


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedslide")
    sub = parser.add_subparsers(dest="command", required=True)
    add_predict(sub)
    add_export(sub)
    args = parser.parse_args(argv)
    return int(args.handler(args))


def _bundle(encoder: PatchEncoder, student_input: str) -> StudentBundle:
    return tiny_student_bundle(encoder, CLASSES, student_input)


# ---- geometry units -------------------------------------------------------------------------------------------
def test_tissue_polygons_keep_holes_and_scale_to_level0() -> None:
    mask = np.zeros((40, 60), bool)
    mask[5:30, 5:35] = True
    mask[12:20, 12:20] = False  # a hole
    mask[32:38, 45:55] = True  # a second piece
    polys = tissue_polygons(mask, (8.0, 8.0), 0.5)  # 16 level-0 px per mask px
    assert len(polys) == 2
    big, small = polys
    assert all(p.is_valid for p in polys)
    assert len(big.interiors) == 1 and len(small.interiors) == 0
    assert big.area == pytest.approx((25 * 30 - 8 * 8) * 16 * 16)
    assert big.bounds == (5 * 16, 5 * 16, 35 * 16, 30 * 16)
    hole = shapely.Polygon(big.interiors[0])
    assert hole.bounds == (12 * 16, 12 * 16, 20 * 16, 20 * 16)
    assert big.exterior.is_ccw  # shells counter-clockwise, as GeoJSON (RFC 7946) asks
    # anisotropic thumbnails scale each axis by its own µm/px
    (poly,) = tissue_polygons(mask[32:38, 45:55], (4.0, 8.0), 1.0)
    assert poly.bounds == (0, 0, 40, 48)
    assert tissue_polygons(np.zeros((5, 5), bool), (1.0, 1.0), 1.0) == []


def test_tissue_polygons_simplified_stay_valid() -> None:
    yy, xx = np.mgrid[:200, :200]
    disc = (xx - 100) ** 2 + (yy - 100) ** 2 < 80**2
    disc &= (xx - 100) ** 2 + (yy - 100) ** 2 > 20**2  # an annulus: one polygon with one hole
    exact = tissue_polygons(disc, (1.0, 1.0), 1.0)
    simple = tissue_polygons(disc, (1.0, 1.0), 1.0, simplify_px=2.0)
    assert len(exact) == len(simple) == 1 and simple[0].is_valid and len(simple[0].interiors) == 1
    assert len(simple[0].exterior.coords) < len(exact[0].exterior.coords)
    assert simple[0].area == pytest.approx(exact[0].area, rel=0.02)


def test_tumour_regions_join_touching_cells_only() -> None:
    coords = np.array([[0, 0], [100, 0], [0, 100], [500, 500], [900, 900]], float)
    probs = np.array([0.9, 0.8, 0.7, 0.95, 0.1])
    regions = tumour_regions(coords, 100.0, probs, 0.5)
    assert len(regions) == 2 and all(r.is_valid for r in regions)
    assert regions[0].area == pytest.approx(3 * 100 * 100)  # the L of three touching cells
    assert regions[1].bounds == (500, 500, 600, 600)
    assert tumour_regions(coords, 100.0, probs, 0.99) == []


def test_tumour_class_choice() -> None:
    assert tumour_class_index(["normal", "Tumour"], None) == 1
    assert tumour_class_index(["cancer", "benign"], None) == 0
    assert tumour_class_index(["a", "b"], None) == 1
    assert tumour_class_index(["a", "b", "c"], "c") == 2
    with pytest.raises(QupathExportError, match=r"tumour-class = 'x'.*classes: a, b, c"):
        tumour_class_index(["a", "b", "c"], "x")
    with pytest.raises(QupathExportError, match="looks like tumour"):
        tumour_class_index(["a", "b", "c"], None)


def test_instance_probabilities_are_one_instance_bags() -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="abmil", in_dim=8, num_classes=2, hidden_dim=16)).eval()
    x, c = torch.randn(5, 8), torch.rand(5, 2) * 100
    probs = instance_probabilities(model, x, c, chunk=2)
    with torch.inference_mode():
        one = torch.softmax(model(x[3:4][None], coords=c[3:4][None]).logits, -1)[0].numpy()
    assert probs.shape == (5, 2) and np.allclose(probs[3], one, atol=1e-6)


# ---- on a real slide ------------------------------------------------------------------------------------------
def _features(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in doc["features"] if f["properties"]["objectType"] == kind]


def _check_qupath_structure(doc: dict[str, Any], width: int, height: int) -> None:
    """What QuPath's GeoJSON import reads, and valid geometry inside the slide (level-0 px)."""
    assert doc["type"] == "FeatureCollection" and doc["features"]
    frame = shapely.box(0, 0, width, height)
    for f in doc["features"]:
        assert f["type"] == "Feature" and isinstance(f["id"], str)
        props = f["properties"]
        assert props["objectType"] in OBJECT_TYPES
        geom = shape(f["geometry"])
        assert f["geometry"]["type"] == "Polygon" and geom.is_valid and geom.area > 0
        assert frame.buffer(1e-6).contains(geom), f"{props.get('name')} leaves the slide: {geom.bounds}"
        assert isinstance(props["isLocked"], bool)
        assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in props["measurements"].values())
        if "classification" in props:
            cls = props["classification"]
            assert set(cls) == {"name", "color"} and isinstance(cls["name"], str)
            assert len(cls["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])


@pytest.fixture(scope="module")
def real_run(
    real_dir: Path, effnet: PatchEncoder, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, StudentBundle]:
    """`fedslide predict --geojson` (pooled student) over the real CMU slide, through the CLI."""
    root = tmp_path_factory.mktemp("qupath")
    slides = root / "slides"
    slides.mkdir()
    (slides / f"{SLIDE}.svs").symlink_to(real_dir / f"{SLIDE}.svs")
    bundle = _bundle(effnet, "pooled")
    bundle.save(root / "bundle")
    out = root / "out"
    argv = ["predict", "--slides", str(slides), "--model", str(root / "bundle"), "--out", str(out), "--geojson"]
    argv += ["--workers", "0", "--no-progress", "--no-heatmaps", "--set", "qupath.region-threshold=0.01"]
    assert _cli(argv) == 0
    return out, slides / f"{SLIDE}.svs", bundle


def test_predict_geojson_on_real_slide(real_run: tuple[Path, Path, StudentBundle]) -> None:
    out, slide, bundle = real_run
    doc = json.loads((out / QUPATH_DIR / f"{SLIDE}.geojson").read_text())
    _check_qupath_structure(doc, 2220, 2967)
    tissue, tiles, tumour = _features(doc, "annotation"), _features(doc, "tile"), None
    tumour = [f for f in tissue if f["properties"]["classification"]["name"] == "tumor"]
    tissue = [f for f in tissue if f["properties"]["classification"]["name"] == "Tissue"]
    assert tissue and tiles and tumour
    assert all(f["properties"]["classification"]["color"] == [200, 0, 0] for f in tumour)

    # the tiles are exactly the low-res grid the student read, in level-0 pixels (computed here independently)
    settings_tissue, tiling = TissueConfig(), TilingConfig()
    with SlideReader(slide, None, SlideConfig().mpp_tolerance) as reader:
        thumb, thumb_mpp = reader.thumbnail(settings_tissue.thumbnail_mpp)
        mask = segment_tissue(thumb, float(np.mean(thumb_mpp)), settings_tissue)
        grid = paired_grid(*reader.dimensions, reader.mpp, tiling, mask, thumb_mpp)
    got = sorted(tuple(shape(f["geometry"]).bounds) for f in tiles)
    side = grid.low_size_level0
    want = sorted((float(x), float(y), min(x + side, 2220.0), min(y + side, 2967.0)) for x, y in grid.low_coords)
    assert np.allclose(got, want)
    assert side == pytest.approx(256 * 2.0 / 0.499)  # a 5x patch spans 1026 level-0 px of this 0.499 µm/px slide

    # tissue annotations cover the thumbnail mask's area in level-0 px; every tile overlaps tissue
    union = shapely.union_all([shape(f["geometry"]) for f in tissue])
    mask_area = mask.sum() * thumb_mpp[0] * thumb_mpp[1] / 0.499**2
    assert union.area == pytest.approx(mask_area, rel=0.03)
    assert all(union.intersects(shape(f["geometry"])) for f in tiles)

    # measurements: attention sums to 1 over the student's instances; tumour probability is the one-instance bag
    record = SlideOverlay.load(out / OVERLAY_DIR / f"{SLIDE}.npz")
    att = np.array([f["properties"]["measurements"][ATTENTION] for f in tiles])
    prob = np.array([f["properties"]["measurements"][TUMOUR_PROBABILITY] for f in tiles])
    assert att.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(prob, record.instance_probs[:, 1], atol=1e-5)
    assert np.all((prob >= 0) & (prob <= 1))
    # a threshold below every probability: one region made of every tile
    tiles_area = shapely.union_all([shape(f["geometry"]) for f in tiles]).area
    assert shapely.union_all([shape(f["geometry"]) for f in tumour]).area == pytest.approx(tiles_area)
    csv = (out / "predictions.csv").read_text()
    assert SLIDE in csv and doc["properties"]["predicted"] in CLASSES


def test_export_qupath_rebuilds_from_past_run(real_run: tuple[Path, Path, StudentBundle], tmp_path: Path) -> None:
    out, _, _ = real_run
    first = json.loads((out / QUPATH_DIR / f"{SLIDE}.geojson").read_text())
    assert _cli(["export-qupath", str(out), "--out", str(tmp_path), "--set", "qupath.region-threshold=0.01"]) == 0
    again = json.loads((tmp_path / QUPATH_DIR / f"{SLIDE}.geojson").read_text())
    assert again == first  # same record, same options: the same file (feature ids included)

    argv = ["export-qupath", str(out), "--out", str(tmp_path / "d"), "--threshold", "0.99"]
    assert _cli(argv + ["--set", "qupath.patch-object=detection"]) == 0
    strict = json.loads((tmp_path / "d" / QUPATH_DIR / f"{SLIDE}.geojson").read_text())
    assert _features(strict, "detection") and not _features(strict, "tile")
    probs = [f["properties"]["measurements"][TUMOUR_PROBABILITY] for f in _features(strict, "detection")]
    n_regions = sum(f["properties"].get("classification", {}).get("name") == "tumor" for f in strict["features"])
    assert (n_regions > 0) == (max(probs) >= 0.99)


def test_export_qupath_refusals(real_run: tuple[Path, Path, StudentBundle], tmp_path: Path, capsys: Any) -> None:
    out, _, _ = real_run
    assert _cli(["export-qupath", str(tmp_path)]) == 2
    assert "no overlay records" in capsys.readouterr().err
    assert _cli(["export-qupath", str(out), "--out", str(tmp_path), "--tumour-class", "nope"]) == 2
    assert "tumour-class = 'nope'" in capsys.readouterr().err
    assert _cli(["export-qupath", str(out), "--set", "qupath.tumour-color=[0,0,300]"]) == 2
    bad = tmp_path / "bad" / OVERLAY_DIR
    bad.mkdir(parents=True)
    (bad / "x.npz").write_bytes(b"not a zip")
    assert _cli(["export-qupath", str(tmp_path / "bad")]) == 2
    assert "not a fedslide overlay record" in capsys.readouterr().err


def test_tokens_student_exports_child_cells(
    real_run: tuple[Path, Path, StudentBundle], effnet: PatchEncoder, tmp_path: Path
) -> None:
    """A token student's instances are the 4x4 child cells of each low patch: one tile per cell."""
    _, slide, _ = real_run
    cfg = PredictConfig.model_validate(
        {"num_workers": 0, "progress": False, "heatmaps": False, "geojson": True, "qupath": QupathConfig()}
    )
    run = predict_slides([slide], _bundle(effnet, "tokens"), tmp_path, cfg, encoder=effnet)
    doc = json.loads((tmp_path / QUPATH_DIR / f"{SLIDE}.geojson").read_text())
    _check_qupath_structure(doc, 2220, 2967)
    tiles = _features(doc, "tile")
    record = SlideOverlay.load(tmp_path / OVERLAY_DIR / f"{SLIDE}.npz")
    assert len(record.attention) == 16 * run.predictions[0].patches_low
    inside = (record.cell_coords[:, 0] < 2220) & (record.cell_coords[:, 1] < 2967)
    assert len(tiles) == inside.sum()
    boxes = np.array([shape(f["geometry"]).bounds for f in tiles])
    interior = (boxes[:, 2] < 2220) & (boxes[:, 3] < 2967)
    assert interior.sum() > 0
    assert np.allclose(boxes[interior, 2] - boxes[interior, 0], 256 * 2.0 / 0.499 / 4)
