"""`fedslide synth`: pyramidal slides OpenSlide opens, deterministic, tiling-independent, labelled cohorts."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from fedslide.client.synth import (
    SCANNER_STYLES,
    Stain,
    generate_cohort,
    make_slide_model,
    plan_site,
    render_region,
    tissue_mask,
    write_pyramidal_tiff,
    write_slide,
)
from fedslide.client.synth.cohort import assign_patients_and_splits
from fedslide.client.synth.fields import SlideFields
from fedslide.client.synth.slide import level0_size
from fedslide.client.synth.tissue_render import SlideModel
from fedslide.client.synth.cli import add_parser
from fedslide.common.config.base import ConfigError, load_config
from fedslide.common.config.synth import SCANNER_STYLE_NAMES, SynthConfig


def _cfg(out: Path, **kw: object) -> SynthConfig:
    base: dict[str, object] = dict(
        out_dir=out, sites=2, slides_per_site=6, seed=11, slide_size_um=(420.0, 520.0), progress=False
    )
    base.update(kw)
    return SynthConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, list[Path]]:
    cfg = _cfg(tmp_path_factory.mktemp("cohort"))
    return cfg, generate_cohort(cfg)


def _labels(site: Path) -> list[dict[str, str]]:
    with (site / "labels.csv").open() as fh:
        return list(csv.DictReader(fh))


def _slide_path(site: Path, slide_id: str) -> Path:
    (path,) = [p for p in (site / "slides").iterdir() if p.stem == slide_id]
    return path


# --------------------------------------------------------------------------- files OpenSlide opens


def test_cohort_sites_open_in_openslide_with_scanner_metadata(cohort: tuple[SynthConfig, list[Path]]) -> None:
    cfg, sites = cohort
    assert [s.name for s in sites] == ["site1", "site2"]
    expected = {
        "site1": ("aperio", ".svs", 0.25, "40", 4),
        "site2": ("generic-tiff", ".tif", 0.5, None, 2),
    }
    for site in sites:
        vendor, ext, mpp, power, step = expected[site.name]
        files = sorted((site / "slides").iterdir())
        assert len(files) == cfg.slides_per_site and all(f.suffix == ext for f in files)
        for path in files:
            with openslide.OpenSlide(str(path)) as slide:
                props = slide.properties
                assert props["openslide.vendor"] == vendor
                assert float(props["openslide.mpp-x"]) == pytest.approx(mpp)
                assert float(props["openslide.mpp-y"]) == pytest.approx(mpp)
                assert props.get("openslide.objective-power") == power
                assert slide.level_count >= 2
                w0, h0 = slide.level_dimensions[0]
                for level, (w, h) in enumerate(slide.level_dimensions):
                    d = step**level
                    assert slide.level_downsamples[level] == pytest.approx(d)
                    assert (w, h) == (math.ceil(w0 / d), math.ceil(h0 / d))
                # physical size inside the configured range (level 0 is rounded up to whole downsamples)
                lo, hi = cfg.slide_size_um
                assert lo - 1 <= w0 * mpp <= hi + 16 * mpp and lo - 1 <= h0 * mpp <= hi + 16 * mpp


def test_plain_style_has_no_resolution_metadata(tmp_path: Path) -> None:
    path = write_slide(tmp_path / "plain.tif", 300, 260, 0.5, "plain", seed=1)
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert "openslide.mpp-x" not in slide.properties
        assert "openslide.objective-power" not in slide.properties
        assert slide.level_count >= 2


def test_custom_pyramid_and_edge_padding(tmp_path: Path) -> None:
    """A 40× Aperio file with levels 1, 4, 16 from a tile callback; odd sizes are padded, not cropped."""
    width, height = 1000, 700

    def tile_fn(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        yy, xx = np.mgrid[y : y + h, x : x + w]
        return np.stack([(xx + level * 50) % 256, yy % 256, np.full_like(xx, 100)], axis=-1).astype(np.uint8)

    path = write_pyramidal_tiff(tmp_path / "custom.svs", width, height, 0.25, "aperio", tile_fn, [1, 4, 16])
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert slide.level_dimensions == ((1000, 700), (250, 175), (63, 44))
        region = np.asarray(slide.read_region((990, 690), 0, (10, 10)).convert("RGB"))
        yy, xx = np.mgrid[690:700, 990:1000]
        assert np.array_equal(region[..., 0], xx % 256) and np.array_equal(region[..., 1], yy % 256)
        level2 = np.asarray(slide.read_region((0, 0), 2, (63, 44)).convert("RGB"))
        assert level2[0, 0, 0] == 100  # (0 + 2 * 50) % 256 from the level-2 callback


# --------------------------------------------------------------------------- determinism, tiling


def _read(path: Path, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region(location, level, size).convert("RGB"))


def test_same_seed_same_pixels_different_seed_different(tmp_path: Path) -> None:
    kw = dict(width_um=500, height_um=400, mpp=0.5, style="generic", tumor=True, pen=True)
    a = write_slide(tmp_path / "a.tif", seed=5, **kw)  # type: ignore[arg-type]
    b = write_slide(tmp_path / "b.tif", seed=5, **kw)  # type: ignore[arg-type]
    c = write_slide(tmp_path / "c.tif", seed=6, **kw)  # type: ignore[arg-type]
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    with openslide.OpenSlide(str(a)) as slide:
        size = slide.level_dimensions[0]
    ra, rb, rc = (_read(p, (0, 0), 0, size) for p in (a, b, c))
    assert np.array_equal(ra, rb)
    assert np.mean(np.any(ra != rc, axis=-1)) > 0.2


def _tissue_point(model: SlideModel, mpp: float) -> tuple[int, int]:
    """A level-0 pixel (x, y) well inside tissue."""
    mask = tissue_mask(model.fields, 8.0)
    ys, xs = np.nonzero(mask)
    i = len(ys) // 2
    return int(xs[i] * 8.0 / mpp), int(ys[i] * 8.0 / mpp)


@pytest.mark.parametrize(("style", "mpp", "tile"), [("generic", 0.5, 128), ("aperio", 0.25, 256)])
def test_tiles_and_levels_match_direct_rendering(tmp_path: Path, style: str, mpp: float, tile: int) -> None:
    seed, w_um, h_um = 21, 420.0, 380.0
    kind = "aperio" if style == "aperio" else "generic"
    path = write_slide(tmp_path / f"s.{style}", w_um, h_um, mpp, kind, seed, tumor=True, tile=tile)
    width, height = level0_size(w_um, h_um, mpp, kind)
    model = make_slide_model(width * mpp, height * mpp, seed, tumor=True)
    x, y = _tissue_point(model, mpp)
    # a window straddling a tile corner of level 0
    x0, y0 = (x // tile) * tile - 37, (y // tile) * tile - 29
    x0, y0 = max(x0, 0), max(y0, 0)
    got = _read(path, (x0, y0), 0, (90, 70))
    assert np.array_equal(got, render_region(model, mpp, x0, y0, 90, 70))
    assert got.std() > 5  # tissue, not glass
    # level 1 (supersampled, prefiltered) across a tile boundary as well
    with openslide.OpenSlide(str(path)) as slide:
        d = int(round(slide.level_downsamples[1]))
        lw, lh = slide.level_dimensions[1]
    lx, ly = max(0, min(x // d - 20, lw - 60)), max(0, min(y // d - 20, lh - 50))
    got1 = _read(path, (lx * d, ly * d), 1, (60, 50))
    assert np.array_equal(got1, render_region(model, mpp * d, lx, ly, 60, 50))


def test_region_rendering_is_independent_of_how_it_is_cut() -> None:
    model = make_slide_model(400, 400, 3, tumor=True, tumor_fraction=0.4)
    for mpp in (0.5, 2.0):
        n = int(300 / mpp)
        whole = render_region(model, mpp, 0, 0, n, n)
        top = render_region(model, mpp, 0, 0, n, n // 3)
        right = render_region(model, mpp, n // 2, n // 3, n - n // 2, n - n // 3)
        assert np.array_equal(whole[: n // 3], top)
        assert np.array_equal(whole[n // 3 :, n // 2 :], right)


# --------------------------------------------------------------------------- labels, splits, masks


def test_labels_balanced_split_and_patients(cohort: tuple[SynthConfig, list[Path]]) -> None:
    cfg, sites = cohort
    all_ids: set[str] = set()
    for site in sites:
        rows = _labels(site)
        assert list(rows[0]) == ["slide_id", "label", "split", "patient_id"]
        ids = [r["slide_id"] for r in rows]
        assert all(i.startswith(f"{site.name}_slide") for i in ids)
        assert {p.stem for p in (site / "slides").iterdir()} == set(ids)
        all_ids.update(ids)
        labels = [r["label"] for r in rows]
        assert labels.count("tumor") == labels.count("normal") == cfg.slides_per_site // 2
        for label in ("tumor", "normal"):
            splits = {r["split"] for r in rows if r["label"] == label}
            assert splits == {"train", "val", "test"}
        assert all(r["patient_id"].startswith(f"{site.name}_patient") for r in rows)
        meta = json.loads((site / "cohort.json").read_text())
        assert meta["seed"] == cfg.seed and meta["mpp"] == SCANNER_STYLES[meta["scanner_style"]].mpp
        assert len(meta["stain"]["hematoxylin"]) == 3
    assert len(all_ids) == cfg.sites * cfg.slides_per_site


def test_split_assignment_groups_patients_and_stratifies() -> None:
    labels = ["tumor"] * 10 + ["normal"] * 10
    patients, splits = assign_patients_and_splits(labels, (0.6, 0.2, 0.2), 0.4, np.random.default_rng(0))
    by_patient: dict[int, list[int]] = {}
    for i, p in enumerate(patients):
        by_patient.setdefault(p, []).append(i)
    assert any(len(v) == 2 for v in by_patient.values())  # some patients have two slides
    for members in by_patient.values():
        assert len({labels[i] for i in members}) == 1 and len({splits[i] for i in members}) == 1
    for label in ("tumor", "normal"):
        counts = {s: sum(labels[i] == label and splits[i] == s for i in range(20)) for s in ("train", "val", "test")}
        assert counts["test"] >= 2 and counts["val"] >= 2 and counts["train"] >= 5
    # four slides: one test slide per class
    _, small = assign_patients_and_splits(
        ["tumor", "normal", "tumor", "normal"], (0.6, 0.2, 0.2), 0.25, np.random.default_rng(1)
    )
    assert sorted(s for s in small if s == "test") == ["test", "test"]
    assert {small[0], small[2]} == {"train", "test"} and {small[1], small[3]} == {"train", "test"}


def test_masks_match_labels_and_lie_in_tissue(cohort: tuple[SynthConfig, list[Path]]) -> None:
    cfg, sites = cohort
    for site in sites:
        info = json.loads((site / "masks" / "masks.json").read_text())
        assert info["mpp"] == cfg.mask_mpp
        for row in _labels(site):
            mask = np.asarray(Image.open(site / "masks" / f"{row['slide_id']}.png")) > 0
            entry = info["slides"][row["slide_id"]]
            mpp0 = entry["level0_mpp"]
            assert mask.shape == (entry["height"], entry["width"])
            assert mask.shape == (
                math.ceil(entry["level0_height"] * mpp0 / cfg.mask_mpp),
                math.ceil(entry["level0_width"] * mpp0 / cfg.mask_mpp),
            )
            if row["label"] == "normal":
                assert not mask.any()
                continue
            assert mask.sum() >= 10
            # tissue seen in the slide itself at the mask's resolution
            with openslide.OpenSlide(str(_slide_path(site, row["slide_id"]))) as slide:
                level = slide.level_count - 1
                thumb = slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB")
                d = slide.level_downsamples[level]
            scale = cfg.mask_mpp / (mpp0 * d)
            thumb = thumb.resize((round(thumb.width / scale), round(thumb.height / scale)), Image.Resampling.BOX)
            rgb = np.asarray(thumb).astype(int)
            tissue = (rgb.max(-1) - rgb.min(-1) > 25) & (rgb.mean(-1) < 225)
            h, w = min(tissue.shape[0], mask.shape[0]), min(tissue.shape[1], mask.shape[1])
            inside = tissue[:h, :w][mask[:h, :w]].mean()
            assert inside > 0.95, f"{row['slide_id']}: only {inside:.2%} of the tumor mask is on tissue"
            # and the tumor covers a plausible share of that tissue
            assert 0.03 < mask.sum() / max(1, tissue.sum()) < 0.6


# --------------------------------------------------------------------------- the tumor cue, stains


def _uniform_model(tumor: bool, seed: int, stain: Stain | None = None) -> SlideModel:
    """A slide that is tissue everywhere, all tumor or all normal."""
    n = 80
    full = np.full((n, n), 1000.0, dtype=np.float32)
    fields = SlideFields(
        width_um=600.0,
        height_um=600.0,
        spacing_um=8.0,
        tissue_sdf=full,
        gain=np.ones((n, n), np.float32),
        orientation=np.where(np.arange(n)[None, :] < n // 2, 0.0, 1.0).repeat(n, 0).astype(np.float32),
        tumor_sdf=full if tumor else None,
    )
    return SlideModel(fields=fields, stain=stain or Stain(), seed=seed)


def _block_std(rgb: np.ndarray, block: int = 4) -> float:
    """Mean standard deviation of grey levels within block × block windows (a local-texture statistic)."""
    g = rgb.astype(np.float64).mean(-1)
    h, w = (g.shape[0] // block) * block, (g.shape[1] // block) * block
    return float(g[:h, :w].reshape(h // block, block, w // block, block).std(axis=(1, 3)).mean())


def test_tumor_cue_clear_at_20x_weak_at_5x() -> None:
    for seed in (101, 202):
        normal, tumor = _uniform_model(False, seed), _uniform_model(True, seed)
        low = [render_region(m, 2.0, 0, 0, 128, 128) for m in (normal, tumor)]  # 5×: 256 µm
        high = [render_region(m, 0.5, 0, 0, 400, 400) for m in (normal, tumor)]  # 20×: 200 µm
        mean_low = [img.reshape(-1, 3).mean(0) for img in low]
        assert np.abs(mean_low[0] - mean_low[1]).max() < 3.0, mean_low  # same colour at 5×
        ratio_high = _block_std(high[1]) / _block_std(high[0])
        ratio_low = _block_std(low[1]) / _block_std(low[0])
        assert ratio_high > 1.8, ratio_high  # crowded nuclei obvious at 20×
        assert ratio_low < 1.5 and ratio_low < ratio_high - 0.5, (ratio_low, ratio_high)


def test_sites_are_stained_differently(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, sites=3, strong_shift_site=3)
    stains = [plan_site(cfg, i).stain for i in (1, 2, 3)]
    means = [render_region(_uniform_model(False, 7, s), 2.0, 0, 0, 96, 96).reshape(-1, 3).mean(0) for s in stains]
    assert np.abs(means[0] - means[1]).max() > 4.0
    strong = min(np.abs(means[2] - means[0]).max(), np.abs(means[2] - means[1]).max())
    assert strong > np.abs(means[0] - means[1]).max()
    # no shift: every site gets the reference stain (slides only jitter around it)
    same = _cfg(tmp_path, sites=2, stain_shift=0.0)
    assert plan_site(same, 1).stain == plan_site(same, 2).stain == Stain()


def test_cohort_tissue_colour_differs_between_sites(cohort: tuple[SynthConfig, list[Path]]) -> None:
    _, sites = cohort
    means = []
    for site in sites:
        pixels = []
        for path in sorted((site / "slides").iterdir()):
            with openslide.OpenSlide(str(path)) as slide:
                level = slide.get_best_level_for_downsample(4.0 / float(slide.properties["openslide.mpp-x"]))
                rgb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
            rgb = rgb.reshape(-1, 3).astype(float)
            pixels.append(rgb[(rgb.max(1) - rgb.min(1) > 25) & (rgb.mean(1) < 225)])
        means.append(np.concatenate(pixels).mean(0))
    assert np.abs(means[0] - means[1]).max() > 4.0, means


# --------------------------------------------------------------------------- streaming, config, CLI


def test_writing_a_large_slide_streams(tmp_path: Path) -> None:
    side = 8000
    full_level0 = side * side * 3
    tracemalloc.start()
    try:
        path = write_slide(tmp_path / "big.tif", side * 0.5, side * 0.5, 0.5, "generic", seed=4, compression="none")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions[0] == (side, side)
    assert peak < full_level0 / 4, f"peak {peak / 1e6:.0f} MB vs a full level 0 of {full_level0 / 1e6:.0f} MB"


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"synth\.sites"):
        load_config(SynthConfig, section="synth", values={"out_dir": str(tmp_path), "sites": 0})
    with pytest.raises(ConfigError, match=r"synth\.slides-per-site"):
        load_config(SynthConfig, section="synth", values={"out_dir": str(tmp_path), "slides_per_site": 1})
    with pytest.raises(ConfigError, match="strong-shift-site"):
        load_config(SynthConfig, section="synth", values={"out_dir": str(tmp_path), "sites": 2, "strong_shift_site": 3})
    with pytest.raises(ConfigError, match=r"synth\.slide-size-um"):
        load_config(SynthConfig, section="synth", values={"out_dir": str(tmp_path), "slide_size_um": [900, 500]})
    with pytest.raises(ConfigError, match=r"synth\.out-dir"):
        load_config(SynthConfig, section="synth", values={})
    with pytest.raises(ConfigError, match=r"synth\.scanner-styles"):
        load_config(SynthConfig, section="synth", values={"out_dir": str(tmp_path), "scanner_styles": ["leica"]})
    assert set(SCANNER_STYLE_NAMES) == set(SCANNER_STYLES)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedslide")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_cli_writes_cohort_and_refuses_a_different_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = [
        "synth",
        "--out",
        str(out),
        "--sites",
        "1",
        "--slides-per-site",
        "2",
        "--seed",
        "3",
        "--set",
        "slide-size-um=[300, 320]",
        "--no-progress",
    ]
    assert _cli(args) == 0
    printed = capsys.readouterr()
    assert "1 sites, 2 slides" in printed.out and "slides:" not in printed.err  # no progress bar
    first = {p.name: p.read_bytes() for p in (out / "site1" / "slides").iterdir()}
    assert len(first) == 2
    assert _cli(args) == 0  # the same cohort: kept, not redone
    assert "0 written, 2 kept" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "site1" / "slides").iterdir()} == first
    with pytest.raises(ConfigError, match="overwrite"):  # a different cohort in the same place
        _cli([*args, "--seed", "4"])
    assert _cli([*args, "--seed", "4", "--set", "overwrite=true"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "site1" / "slides").iterdir()} != first
    with pytest.raises(ConfigError, match=r"synth\.out-dir"):
        _cli(["synth", "--sites", "1"])


def test_parallel_workers_write_the_same_bytes(tmp_path: Path) -> None:
    kw: dict[str, object] = dict(sites=1, slides_per_site=2, slide_size_um=(300.0, 330.0), pen_mark_fraction=1.0)
    serial = generate_cohort(_cfg(tmp_path / "serial", **kw))[0]
    parallel = generate_cohort(_cfg(tmp_path / "parallel", workers=2, **kw))[0]
    for name in ("labels.csv", "cohort.json", "masks/masks.json"):
        assert (serial / name).read_bytes() == (parallel / name).read_bytes()
    files = sorted(p.name for p in (serial / "slides").iterdir())
    assert files == sorted(p.name for p in (parallel / "slides").iterdir()) and len(files) == 2
    for name in files:
        assert (serial / "slides" / name).read_bytes() == (parallel / "slides" / name).read_bytes()
