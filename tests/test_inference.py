"""`fedslide predict`: low-res-only inference, outputs, train/inference feature parity, zoom, refusals, heatmaps."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedslide.client.encoders import PatchEncoder, build_encoder
from fedslide.client.heatmaps import (
    InstanceMap,
    figure_to_array,
    heatmap_layout,
    instance_raster,
    render_heatmap,
    write_heatmap,
)
from fedslide.client.inference import (
    ModelDirError,
    PredictionRun,
    load_bundle,
    predict_slide,
    predict_slides,
)
from fedslide.client.inference.slide import heatmap_mpp
from fedslide.client.inference.zoom import region_relevance, region_scores, select_regions, subset_grid
from fedslide.client.predict_cli import add_parser
from fedslide.client.preprocess import SitePreprocessor
from fedslide.client.slides import SlideReader
from fedslide.client.synth.slide import write_slide
from fedslide.client.synth.tiff_writer import write_pyramidal_tiff
from fedslide.client.tiling import PairedGrid
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.preprocess import EncoderConfig, PreprocessConfig, TilingConfig, TissueConfig
from fedslide.common.distillation.adapter import AdapterSpec, build_adapter
from fedslide.common.distillation.bundle import BundleMeta, BundleMismatchError, StudentBundle
from fedslide.common.features import feature_path, read_feature_file
from fedslide.common.models.registry import build_model

CLASSES = ["normal", "tumor"]
LOW_MPP, HIGH_MPP = 2.0, 0.5


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedslide")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def _cfg(**kw: object) -> PredictConfig:
    return PredictConfig.model_validate({"num_workers": 0, "batch_size": 16, "progress": False, **kw})


def _bundle(encoder: PatchEncoder, student_input: str, seed: int = 0, **meta: object) -> StudentBundle:
    """A bundle of small random models carrying the real encoder's identity."""
    torch.manual_seed(seed)
    mc = ModelConfig(name="abmil", in_dim=encoder.dim, num_classes=len(CLASSES), hidden_dim=32, attention_dim=16)
    fields = {
        "encoder_name": encoder.name,
        "encoder_weights_hash": encoder.weights_hash,
        "encoder_dim": encoder.dim,
        "encoder_fingerprint": encoder.fingerprint,
        "low_mpp": LOW_MPP,
        "low_patch_size": 256,
        "high_mpp": HIGH_MPP,
        "high_patch_size": 256,
        "child_grid": 4,
        "token_grid": 4,
        "student_input": student_input,
        "class_names": CLASSES,
        "tissue": TissueConfig().model_dump(mode="json"),
        "tiling": TilingConfig().model_dump(mode="json"),
    }
    fields.update(meta)
    adapter = build_adapter(AdapterSpec(in_dim=encoder.dim, out_dim=encoder.dim, hidden_dim=32))
    return StudentBundle(BundleMeta(**fields), adapter, build_model(mc), build_model(mc), mc, mc)


class _ReadLog:
    """Records the target µm/px (and origin) of every region and thumbnail read through SlideReader."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.regions: list[tuple[float, int, int, int]] = []
        self.thumbnails: list[float] = []
        read_region, thumbnail = SlideReader.read_region, SlideReader.thumbnail

        def rec_region(reader: SlideReader, x0: int, y0: int, target_mpp: float, size_px: int) -> np.ndarray:
            self.regions.append((target_mpp, int(x0), int(y0), size_px))
            return read_region(reader, x0, y0, target_mpp, size_px)

        def rec_thumb(reader: SlideReader, target_mpp: float):  # noqa: ANN202
            self.thumbnails.append(target_mpp)
            return thumbnail(reader, target_mpp)

        monkeypatch.setattr(SlideReader, "read_region", rec_region)
        monkeypatch.setattr(SlideReader, "thumbnail", rec_thumb)

    def mpps(self) -> set[float]:
        return {r[0] for r in self.regions}


@pytest.fixture(scope="module")
def encoder() -> PatchEncoder:
    return build_encoder(EncoderConfig())


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ~1 mm slides: a 20× generic TIFF with tumor and a 40× Aperio SVS."""
    folder = tmp_path_factory.mktemp("pred_slides")
    write_slide(folder / "g20.tif", 1000, 1000, 0.5, "generic", seed=3, tumor=True, tumor_fraction=0.4)
    write_slide(folder / "a40.svs", 1000, 1000, 0.25, "aperio", seed=4)
    return folder


@pytest.fixture(scope="module")
def bundle_dirs(encoder: PatchEncoder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    dirs = {}
    for mode in ("tokens", "pooled"):
        _bundle(encoder, mode).save(root / mode)
        dirs[mode] = root / mode
    return dirs


@pytest.fixture(scope="module")
def low_run(
    slides: Path, bundle_dirs: dict[str, Path], encoder: PatchEncoder, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PredictionRun, _ReadLog]:
    """The tokens bundle over both slides in low-res mode, every slide read recorded."""
    with pytest.MonkeyPatch.context() as mp:
        log = _ReadLog(mp)
        run = predict_slides(slides, bundle_dirs["tokens"], tmp_path_factory.mktemp("out_low"), _cfg(), encoder=encoder)
    return run, log


def test_low_run_outputs(low_run: tuple[PredictionRun, _ReadLog], slides: Path) -> None:
    run, _ = low_run
    out = run.out_dir
    with (out / "predictions.csv").open() as fh:
        reader = csv.DictReader(fh)
        rows = {row["slide_id"]: row for row in reader}
        header = reader.fieldnames
    assert header == ["slide_id", "prob_normal", "prob_tumor", "predicted", "probability", "patches_low", "seconds"]
    assert set(rows) == {"g20", "a40"} and not (out / "failures.csv").exists()
    timing = json.loads((out / "timing.json").read_text())
    for pred in run.predictions:
        row = rows[pred.slide_id]
        probs = np.array([float(row["prob_normal"]), float(row["prob_tumor"])])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5) and (probs > 0).all()
        assert row["predicted"] == CLASSES[int(probs.argmax())] == pred.label
        assert int(row["patches_low"]) == pred.patches_low == pred.patches > 0
        # tokens mode: 16 instances per low patch, each a 128-µm cell
        assert len(pred.attention.values) == 16 * pred.patches_low
        assert pred.attention.size_level0 * pred.slide_mpp == pytest.approx(128.0)
        assert pred.attention.values.sum() == pytest.approx(1.0, abs=1e-4)
        t = timing["slides"][pred.slide_id]
        for key in ("thumbnail_tissue_s", "read_encode_s", "model_s", "total_s", "patches", "heatmap_s"):
            assert key in t
        assert t["patches"] == pred.patches_low
        parts = t["open_s"] + t["thumbnail_tissue_s"] + t["read_encode_s"] + t["model_s"]
        assert t["total_s"] == pytest.approx(parts, abs=2e-3)
        assert float(row["seconds"]) == pytest.approx(t["total_s"], abs=2e-3)
        with SlideReader(slides / Path(pred.path).name) as s:
            mpp = max(s.mpp, LOW_MPP, max(s.dimensions) * s.mpp / 1024)
            thumb, _ = s.thumbnail(mpp)
        layout = heatmap_layout(thumb.shape[1], thumb.shape[0])
        with Image.open(out / "heatmaps" / f"{pred.slide_id}.png") as im:
            assert im.size == (layout.width, layout.height)
    assert timing["resolution"] == "low" and timing["summary"]["slides"] == 2


def test_low_mode_reads_only_low_res(low_run: tuple[PredictionRun, _ReadLog]) -> None:
    run, log = low_run
    assert log.mpps() == {LOW_MPP}  # not one region at high resolution
    assert len(log.regions) == sum(p.patches_low for p in run.predictions)
    assert all(m >= LOW_MPP for m in log.thumbnails)  # tissue and heatmap thumbnails are coarser still


def test_features_equal_preprocess_low(
    slides: Path, bundle_dirs: dict[str, Path], encoder: PatchEncoder, tmp_path: Path
) -> None:
    bundle = load_bundle(bundle_dirs["tokens"])
    site = tmp_path / "site"
    (site / "slides").mkdir(parents=True)
    shutil.copy(slides / "g20.tif", site / "slides")
    pcfg = PreprocessConfig.model_validate(
        {
            "resolutions": "low",
            "progress": False,
            "qc_images": False,
            "tissue": bundle.meta.tissue,
            "tiling": bundle.meta.tiling,
            "encoder": {"num_workers": 0, "batch_size": 16},
        }
    )
    assert SitePreprocessor(pcfg, encoder).run(site).count("done") == 1
    ref = read_feature_file(feature_path(site, encoder.name, "low", "g20"), load_tokens=True)
    bundle.check_features(ref.attrs)  # the file is one this bundle accepts
    pred = predict_slide(slides / "g20.tif", bundle, encoder, _cfg(), keep_arrays=True)
    seen = pred.low_pass
    assert seen is not None and ref.tokens is not None and seen.tokens is not None
    np.testing.assert_array_equal(seen.coords, ref.coords)
    np.testing.assert_allclose(seen.features, ref.features, atol=1e-4)
    np.testing.assert_allclose(seen.tokens, ref.tokens, atol=1e-3)
    # the student's prediction from the file's features equals the one made from the slide
    probs, *_ = bundle.predict_low(
        torch.from_numpy(ref.features), torch.from_numpy(ref.tokens), torch.from_numpy(ref.coords)
    )
    np.testing.assert_allclose(probs.numpy(), pred.probs, atol=1e-4)


def test_zoom_encodes_only_children_of_top_k(
    slides: Path, bundle_dirs: dict[str, Path], encoder: PatchEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(bundle_dirs["tokens"])
    slide = slides / "a40.svs"  # 3 low patches, 18 kept high patches
    low = predict_slide(slide, bundle, encoder, _cfg(), keep_arrays=True)
    assert low.low_pass is not None
    arrays = low.low_pass
    _, att, low_index, _ = bundle.predict_low(
        torch.from_numpy(arrays.features), torch.from_numpy(arrays.tokens), torch.from_numpy(arrays.coords)
    )
    top = int(np.argmax(region_scores(att.numpy(), low_index.numpy(), low.patches_low)))

    encoded: list[int] = []
    real_encode = encoder.encode

    def counting(x: torch.Tensor, token_grid: int = 0):  # noqa: ANN202
        encoded.append(int(x.shape[0]))
        return real_encode(x, token_grid)

    monkeypatch.setattr(encoder, "encode", counting)
    log = _ReadLog(monkeypatch)
    run = predict_slides([slide], bundle, tmp_path / "zoom1", _cfg(zoom_k=1, heatmaps=False), encoder=encoder)
    pred = run.predictions[0]
    z = pred.zoom
    assert z is not None and z.regions.tolist() == [top] and z.probs is not None
    high_reads = [r for r in log.regions if r[0] == HIGH_MPP]
    assert [(x, y) for _, x, y, _ in high_reads] == [tuple(arrays.coords[top])]  # only that region at high res
    assert sum(encoded) == pred.patches_low + z.patches_high and 0 < z.patches_high <= 16
    assert z.patches_high_total == pred.patches_high_total > z.patches_high
    assert z.cost_saved == pytest.approx(1 - z.patches_high / z.patches_high_total)
    with (run.out_dir / "predictions.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert int(row["zoom_patches_high"]) == z.patches_high and int(row["zoom_regions"]) == 1
    assert float(row["zoom_cost_saved"]) == pytest.approx(z.cost_saved, abs=1e-4)
    assert float(row["zoom_prob_normal"]) + float(row["zoom_prob_tumor"]) == pytest.approx(1.0, abs=1e-5)

    # K beyond the number of low patches: every region, i.e. all kept high patches; nothing saved
    encoded.clear()
    big = predict_slides([slide], bundle, tmp_path / "zoom_all", _cfg(zoom_k=1000, heatmaps=False), encoder=encoder)
    zb = big.predictions[0].zoom
    assert zb is not None and len(zb.regions) <= pred.patches_low
    assert zb.patches_high == zb.patches_high_total and zb.cost_saved == 0.0
    assert sum(encoded) == pred.patches_low + zb.patches_high_total
    saved = json.loads((big.out_dir / "timing.json").read_text())["summary"]["zoom"]["cost_saved"]
    assert saved == 0.0

    # the high-res reference mode encodes exactly those kept high patches and runs the teacher
    encoded.clear()
    log.regions.clear()
    high = predict_slides([slide], bundle, tmp_path / "high", _cfg(resolution="high", heatmaps=False), encoder=encoder)
    hp = high.predictions[0]
    assert hp.patches == zb.patches_high_total == sum(encoded)
    assert log.mpps() == {HIGH_MPP}
    np.testing.assert_allclose(hp.probs, zb.probs, atol=1e-4)  # same patches, same teacher


def test_pooled_bundle(slides: Path, bundle_dirs: dict[str, Path], encoder: PatchEncoder, tmp_path: Path) -> None:
    run = predict_slides([slides / "a40.svs"], bundle_dirs["pooled"], tmp_path / "pooled", _cfg(), encoder=encoder)
    pred = run.predictions[0]
    assert len(pred.attention.values) == pred.patches_low  # one instance per low patch: 512-µm cells
    assert pred.attention.size_level0 * pred.slide_mpp == pytest.approx(512.0)
    assert pred.probs.sum() == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "pooled" / "heatmaps" / "a40.png").is_file()


def test_bundle_of_another_encoder_is_refused(
    slides: Path, encoder: PatchEncoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _bundle(encoder, "tokens", encoder_weights_hash="f" * 64, encoder_fingerprint="e" * 64)
    other.save(tmp_path / "other")
    with pytest.raises(BundleMismatchError) as err:
        predict_slides(slides, tmp_path / "other", tmp_path / "out", _cfg(), encoder=encoder)
    message = str(err.value)
    assert "efficientnet_lite0" in message and "ffffffffffff" in message and encoder.weights_hash[:12] in message
    code = _cli(["predict", "--slides", str(slides), "--model", str(tmp_path / "other"), "--out", str(tmp_path / "o2")])
    assert code == 2 and "ffffffffffff" in capsys.readouterr().err
    missing = ["predict", "--slides", str(slides), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")]
    assert _cli(missing) == 2
    with pytest.raises(ModelDirError):
        load_bundle(tmp_path / "out")


def _white(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    return np.full((h, w, 3), 242, np.uint8)


def test_bad_slides_listed_and_good_one_predicted(
    slides: Path, bundle_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slides / "a40.svs", folder)
    (folder / "notes.svs").write_text("not a slide at all")
    write_slide(folder / "nompp.tif", 600, 600, 0.5, "plain", seed=5)
    write_pyramidal_tiff(folder / "empty.tif", 1024, 1024, 0.5, "generic", _white)
    out = tmp_path / "out"
    argv = ["predict", "--slides", str(folder), "--model", str(bundle_dirs["tokens"]), "--out", str(out)]
    code = _cli([*argv, "--workers", "0", "--batch-size", "16", "--no-progress", "--no-heatmaps"])
    assert code == 3
    with (out / "failures.csv").open() as fh:
        failures = {row["slide_id"]: row["reason"] for row in csv.DictReader(fh)}
    assert set(failures) == {"notes", "nompp", "empty"}
    assert "not a slide format" in failures["notes"]
    assert "no resolution metadata" in failures["nompp"] and "--mpp" in failures["nompp"]
    assert "no tissue" in failures["empty"]
    with (out / "predictions.csv").open() as fh:
        assert [row["slide_id"] for row in csv.DictReader(fh)] == ["a40"]
    assert not (out / "heatmaps").exists()
    captured = capsys.readouterr()
    assert "predicted 1 slide(s), 3 failed" in captured.out and "nompp" in captured.err


def test_zoom_threshold_selects_the_relevant_regions(
    slides: Path, bundle_dirs: dict[str, Path], encoder: PatchEncoder, tmp_path: Path
) -> None:
    bundle = load_bundle(bundle_dirs["tokens"])
    slide = slides / "a40.svs"
    low = predict_slide(slide, bundle, encoder, _cfg(), keep_arrays=True)
    assert low.low_pass is not None
    arrays = low.low_pass
    _, att, low_index, _ = bundle.predict_low(
        torch.from_numpy(arrays.features), torch.from_numpy(arrays.tokens), torch.from_numpy(arrays.coords)
    )
    relevance = region_relevance(region_scores(att.numpy(), low_index.numpy(), low.patches_low))
    threshold = float(np.sort(relevance)[-2]) - 1e-6  # the two most relevant regions pass (ties aside)
    run = predict_slides(
        [slide], bundle, tmp_path / "thr", _cfg(zoom_threshold=threshold, heatmaps=False), encoder=encoder
    )
    z = run.predictions[0].zoom
    assert z is not None
    expected = np.flatnonzero(relevance > threshold)
    assert set(z.regions.tolist()) <= set(expected.tolist()) and len(z.regions) >= 1  # regions with children
    timing = json.loads((run.out_dir / "timing.json").read_text())["summary"]["zoom"]
    assert timing["threshold"] == pytest.approx(threshold) and timing["rule"].startswith("relevance >")
    with (run.out_dir / "predictions.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert int(row["zoom_regions"]) == len(z.regions)
    assert any("zoom relevance >" in line for line in run.summary_lines())
    # a cap of one region keeps only the most relevant of those that pass
    capped = predict_slides(
        [slide], bundle, tmp_path / "cap", _cfg(zoom_threshold=threshold, zoom_k=1, heatmaps=False), encoder=encoder
    )
    zc = capped.predictions[0].zoom
    assert zc is not None and zc.regions.tolist() == [int(np.argmax(relevance))]


def test_zoom_threshold_out_of_range_is_a_usage_error(
    slides: Path, bundle_dirs: dict[str, Path], tmp_path: Path
) -> None:
    argv = ["predict", "--slides", str(slides), "--model", str(bundle_dirs["tokens"]), "--out", str(tmp_path / "o")]
    assert _cli([*argv, "--zoom-threshold", "1.5"]) == 2
    assert _cli([*argv, "--zoom-threshold", "0.5", "--resolution", "high"]) == 2
    assert not (tmp_path / "o").exists()


def test_options_the_bundle_cannot_serve_are_refused(encoder: PatchEncoder, slides: Path, tmp_path: Path) -> None:
    no_teacher = _bundle(encoder, "tokens")
    no_teacher.teacher = None
    no_teacher.save(tmp_path / "nt")
    argv = ["predict", "--slides", str(slides), "--model", str(tmp_path / "nt"), "--out", str(tmp_path / "o")]
    assert _cli([*argv, "--zoom", "2"]) == 2
    assert _cli([*argv, "--resolution", "high"]) == 2
    assert _cli([*argv, "--zoom", "2", "--resolution", "high"]) == 2
    assert _cli([*argv, "--set", "batch-size=0"]) == 2  # invalid option value: ConfigError -> 2
    assert not (tmp_path / "o").exists()


def _grid() -> PairedGrid:
    """Three low patches (the middle one without kept children), 16 px each, 4×4 children of 4 px."""
    lows = np.array([[0, 0], [16, 0], [32, 0]])
    parents = np.array([0, 0, 0, 2, 2])
    children = np.array([0, 5, 15, 1, 2])
    highs = lows[parents] + np.stack([children % 4, children // 4], axis=1) * 4
    return PairedGrid(4, lows, 16.0, np.ones(3), highs, 4.0, parents, children, np.ones(5))


def test_region_selection_and_subset_grid() -> None:
    grid = _grid()
    att = np.array([0.1, 0.2, 0.3, 0.4])  # instances of low patches 0, 1, 1, 2 (summed per patch)
    scores = region_scores(att, np.array([0, 1, 1, 2]), 3)
    np.testing.assert_allclose(scores, [0.1, 0.5, 0.4])
    assert select_regions(scores, grid, 1).tolist() == [2]  # patch 1 scores higher but has no children
    assert select_regions(scores, grid, 10).tolist() == [0, 2]  # K caps at the patches with children
    assert select_regions(scores, grid, 0).tolist() == []
    sub, kept = subset_grid(grid, np.array([2]))
    assert kept.tolist() == [3, 4] and sub.high_parent.tolist() == [0, 0]
    assert sub.children_of(0).tolist() == [0, 1] and sub.low_coords.tolist() == [[32, 0]]


def test_instance_raster_places_cells() -> None:
    coords = np.array([[0.0, 0.0], [128.0, 0.0], [128.0, 256.0]])
    raster = instance_raster(InstanceMap(coords, 128.0, np.array([1.0, 2.0, 3.0])), (300, 400))
    assert raster.shape == (4, 3)
    assert raster[0, 0] == 1.0 and raster[0, 1] == 2.0 and raster[2, 1] == 3.0
    assert np.isnan(raster).sum() == 12 - 3


def test_heatmap_hottest_where_attention_is(tmp_path: Path) -> None:
    """Four low patches in tokens mode, one child slot holding most attention: that cell renders hottest."""
    slide_mpp, size0 = 0.5, 1024.0  # low patch = 512 µm; child cell = 256 level-0 px
    lows = np.array([[0, 0], [1024, 0], [0, 1024], [1024, 1024]], dtype=np.float64)
    slot = np.tile(np.arange(16), 4)
    base = np.repeat(lows, 16, axis=0)
    coords = base + np.stack([slot % 4, slot // 4], axis=1) * size0 / 4
    values = np.full(64, 0.5 / 63)
    hot = 3 * 16 + 6  # low patch 3, child row 1, col 2
    values[hot] = 0.5
    thumb_mpp = 4.0  # 256 x 256 thumbnail; a child cell is 32 px
    thumb = np.full((256, 256, 3), 200, np.uint8)
    fig = render_heatmap(
        thumb, (thumb_mpp, thumb_mpp), slide_mpp, (2048, 2048), InstanceMap(coords, size0 / 4, values), title="test"
    )
    image = figure_to_array(fig)
    layout = heatmap_layout(256, 256)
    assert image.shape[:2] == (layout.height, layout.width)
    left, top, w, h = layout.image_box
    crop = image[top : top + h, left : left + w].astype(np.float64)
    heat = (crop[..., 0] - crop[..., 2]).reshape(8, 32, 8, 32).mean(axis=(1, 3))  # red minus blue per cell
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    hx, hy = coords[hot] / (size0 / 4)
    assert (row, col) == (int(hy), int(hx))
    assert heat[row, col] > np.delete(heat.ravel(), row * 8 + col).max() + 20
    written = write_heatmap(tmp_path / "h.png", fig)
    with Image.open(written) as im:
        assert im.size == (layout.width, layout.height)


def test_heatmap_never_finer_than_low_res(slides: Path, bundle_dirs: dict[str, Path]) -> None:
    bundle = load_bundle(bundle_dirs["tokens"])
    with SlideReader(slides / "a40.svs") as s:
        assert heatmap_mpp(s, bundle, _cfg()) == LOW_MPP  # a 1 mm slide at 1024 px would be ~1 µm/px
        assert heatmap_mpp(s, bundle, _cfg(heatmap_size=128)) == pytest.approx(max(s.dimensions) * s.mpp / 128)


def test_bundle_settings_as_distill_writes_them_are_accepted(encoder: PatchEncoder) -> None:
    """`fedslide distill` stores tissue/tiling with kebab-case keys (to_toml_dict); predict must read them."""
    from fedslide.client.inference.model import slide_settings

    bundle = _bundle(
        encoder,
        "tokens",
        tissue=TissueConfig(thumbnail_mpp=4.0).to_toml_dict(),
        tiling=TilingConfig(min_tissue_high=0.4).to_toml_dict(),
    )
    settings = slide_settings(bundle)
    assert settings.tiling.min_tissue_high == 0.4 and settings.tissue.thumbnail_mpp == 4.0
    assert settings.tiling.ratio == 4 and settings.token_grid == 4
