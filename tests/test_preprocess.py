"""Preprocessing end to end: synthetic cohort + real slide, schema, low-only mode, resume, bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedslide.client.encoders import PatchEncoder, build_encoder
from fedslide.client.preprocess import SitePreprocessor
from fedslide.client.slides import SlideReader
from fedslide.client.synth.slide import write_slide
from fedslide.client.synth.tiff_writer import write_pyramidal_tiff
from fedslide.deploy.cli import main
from fedslide.client.inference.model import load_bundle, slide_settings
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.preprocess import EncoderConfig, PreprocessConfig, TilingConfig, TissueConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.data import load_sites
from fedslide.common.distillation.pipeline import bundle_meta
from fedslide.common.features import feature_path, is_complete, read_feature_file, recorded_preprocess
from fedslide.common.models.registry import build_model

ENC = "efficientnet_lite0"


def _cfg(**kw: object) -> PreprocessConfig:
    base: dict = {"progress": False, "encoder": {"num_workers": 1, "batch_size": 16}}
    base.update(kw)
    return PreprocessConfig.model_validate(base)


@pytest.fixture(scope="session")
def encoder() -> PatchEncoder:
    return build_encoder(EncoderConfig())


@pytest.fixture(scope="session")
def site_40x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One site: a 40× Aperio tumor slide and a 20× generic-TIFF normal slide, ~1 mm each."""
    site = tmp_path_factory.mktemp("site40")
    (site / "slides").mkdir()
    write_slide(site / "slides" / "a40.svs", 1000, 1100, 0.25, "aperio", seed=1, tumor=True, tumor_fraction=0.4)
    write_slide(site / "slides" / "g20.tif", 1100, 1000, 0.5, "generic", seed=2, pen=True)
    return site


@pytest.fixture(scope="session")
def processed(site_40x: Path, real_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic site plus the real CMU slide, preprocessed through the CLI."""
    site = tmp_path_factory.mktemp("processed")
    shutil.copytree(site_40x / "slides", site / "slides")
    shutil.copy(real_dir / "CMU-1-Small-Region.svs", site / "slides")
    code = main(["preprocess", "--site", str(site), "--no-progress", "--batch-size", "16"])
    assert code == 0
    return site


def test_level_selection_by_resolution(site_40x: Path) -> None:
    with SlideReader(site_40x / "slides" / "a40.svs") as s:
        assert s.vendor == "aperio" and s.mpp == pytest.approx(0.25)
        assert s.level_mpps[:2] == pytest.approx([0.25, 1.0])
        assert s.best_level(0.5) == 0  # 20× comes from 40× level 0, resampled
        assert s.best_level(2.0) == 1  # 5× from the 10× level
        assert s.best_level(0.2) == 0  # finer than anything stored: level 0, upsampled
    with SlideReader(site_40x / "slides" / "g20.tif") as s:
        assert s.vendor == "generic-tiff" and s.mpp == pytest.approx(0.5)
        assert s.best_level(0.5) == 0 and s.best_level(2.0) == 2  # 1, 2, 4, ... pyramid: 5× is stored


def test_resampled_read_matches_level0_box_average(site_40x: Path) -> None:
    with SlideReader(site_40x / "slides" / "a40.svs") as s:
        low = s.read_region(512, 512, 2.0, 64).astype(float)  # from level 1, halved
        full = s.read_region(512, 512, 0.25, 512).astype(float)  # level 0 as stored
        boxed = full.reshape(64, 8, 64, 8, 3).mean(axis=(1, 3))
        assert np.abs(low - boxed).mean() < 6.0


def test_feature_files_schema_and_geometry(processed: Path) -> None:
    for slide_id, slide_file in [
        ("a40", "a40.svs"),
        ("g20", "g20.tif"),
        ("CMU-1-Small-Region", "CMU-1-Small-Region.svs"),
    ]:
        low = read_feature_file(feature_path(processed, ENC, "low", slide_id), load_tokens=True)
        high = read_feature_file(feature_path(processed, ENC, "high", slide_id))
        assert is_complete(low.path) and is_complete(high.path)
        assert low.features.shape[1] == high.features.shape[1] == 1280
        assert low.tokens is not None and low.tokens.shape == (len(low), 16, 1280)
        np.testing.assert_allclose(low.tokens.mean(axis=1), low.features, atol=2e-2)  # GAP = mean of the 4×4 grid
        assert len(high) > len(low) > 0 and np.isfinite(high.features).all()
        for bag, res, mpp in [(low, "low", 2.0), (high, "high", 0.5)]:
            assert bag.attrs["resolution"] == res and bag.attrs["target_mpp"] == mpp
            assert bag.attrs["encoder_name"] == ENC and bag.attrs["encoder_dim"] == 1280
            assert len(bag.attrs["encoder_weights_hash"]) == 64 and bag.attrs["slide_id"] == slide_id
        with SlideReader(processed / "slides" / slide_file) as s:
            w, h = s.dimensions
            assert low.attrs["slide_mpp"] == pytest.approx(s.mpp)
            assert low.attrs["patch_size_level0"] == round(512 / s.mpp)
        assert (high.coords >= 0).all() and (high.coords[:, 0] < w).all() and (high.coords[:, 1] < h).all()
        # every high patch sits at its (row, col) slot inside its parent low patch
        size0 = high.attrs["patch_size_level0_exact"]
        row, col = np.divmod(high.child, 4)
        expect = low.coords[high.parent] + np.stack([col, row], axis=1) * size0
        assert np.abs(high.coords - expect).max() <= 1
        assert (np.diff(high.parent) >= 0).all()
    assert (processed / "qc" / "a40.png").is_file() and (processed / "qc" / "CMU-1-Small-Region.png").is_file()
    assert not (processed / "features" / ENC / "failures.csv").exists()


def test_low_only_mode_matches_low_of_both(processed: Path, tmp_path: Path, encoder: PatchEncoder) -> None:
    site = tmp_path / "lowonly"
    (site / "slides").mkdir(parents=True)
    shutil.copy(processed / "slides" / "a40.svs", site / "slides")
    summary = SitePreprocessor(_cfg(resolutions="low"), encoder).run(site)
    assert summary.count("done") == 1 and summary.patches("high") == 0
    assert not feature_path(site, ENC, "high", "a40").exists()
    ours = read_feature_file(feature_path(site, ENC, "low", "a40"))
    ref = read_feature_file(feature_path(processed, ENC, "low", "a40"))
    np.testing.assert_array_equal(ours.coords, ref.coords)
    np.testing.assert_allclose(ours.features, ref.features, atol=1e-4)


def test_a_bundle_predicts_with_the_thresholds_its_site_preprocessed_with(
    site_40x: Path, tmp_path: Path, encoder: PatchEncoder
) -> None:
    site = tmp_path / "strict"
    shutil.copytree(site_40x / "slides", site / "slides")
    cfg = _cfg(
        qc_images=False,
        tissue={"min_saturation": 25, "remove_pen": False},
        tiling={"min_tissue_low": 0.3, "min_tissue_high": 0.5},
    )
    assert SitePreprocessor(cfg, encoder).run(site).count("done") == 2
    for res in ("low", "high"):
        attrs = read_feature_file(feature_path(site, ENC, res, "a40")).attrs
        assert recorded_preprocess(attrs) == (cfg.tissue.to_toml_dict(), cfg.tiling.to_toml_dict())
    (site / "labels.csv").write_text("slide_id,label,split\na40,tumor,train\ng20,normal,val\n")
    data = load_sites([site], ENC)
    model_cfg = ModelConfig(in_dim=data.feature_dim, hidden_dim=8)
    # the federated site step passes no preprocessing config: the bundle takes the site's from its files
    StudentBundle(bundle_meta(data, "raw", None, {}), None, build_model(model_cfg), student_config=model_cfg).save(
        tmp_path / "bundle"
    )
    settings = slide_settings(load_bundle(tmp_path / "bundle"))
    assert (settings.tissue, settings.tiling) == (cfg.tissue, cfg.tiling)
    assert settings.tiling != TilingConfig() and settings.tissue != TissueConfig()


@pytest.mark.slow
def test_rerun_skips_finished_and_redoes_unmarked_or_changed(
    processed: Path, tmp_path: Path, encoder: PatchEncoder
) -> None:
    site = tmp_path / "resume"
    shutil.copytree(processed / "slides", site / "slides", ignore=shutil.ignore_patterns("CMU*"))
    shutil.copytree(processed / "features", site / "features")
    cfg = _cfg()
    first = SitePreprocessor(cfg, encoder).run(site)
    assert [s.status for s in first.slides] == ["skipped", "skipped"]
    target = feature_path(site, ENC, "high", "g20")
    with h5py.File(target, "r+") as f:  # a file that lost its completeness marker is not trusted
        f.attrs["fedslide_complete"] = False
    second = SitePreprocessor(cfg, encoder).run(site)
    assert {s.slide_id: s.status for s in second.slides} == {"a40": "skipped", "g20": "done"}
    assert is_complete(target)
    old_hash = read_feature_file(target).attrs["config_hash"]
    changed = SitePreprocessor(_cfg(tiling={"min_tissue_high": 0.5}), encoder).run(site)
    assert [s.status for s in changed.slides] == ["done", "done"]  # other settings: redone, not skipped
    assert read_feature_file(target).attrs["config_hash"] != old_hash
    assert len(read_feature_file(target)) <= len(read_feature_file(feature_path(processed, ENC, "high", "g20")))


class _Crashing(PatchEncoder):
    """Wraps the real encoder and fails on its second batch, like a killed process mid-slide."""

    def __init__(self, inner: PatchEncoder):
        super().__init__(
            name=inner.name,
            dim=inner.dim,
            weights_hash=inner.weights_hash,
            mean=inner.mean,
            std=inner.std,
            has_feature_map=inner.has_feature_map,
        )
        self.inner = inner
        self.calls = 0

    def identity(self) -> dict[str, object]:
        return self.inner.identity()

    def encode(self, x, token_grid: int = 0):  # type: ignore[override]
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("simulated crash while encoding")
        return self.inner.encode(x, token_grid)


@pytest.mark.slow
def test_interrupted_slide_leaves_nothing_and_is_redone(site_40x: Path, tmp_path: Path, encoder: PatchEncoder) -> None:
    site = tmp_path / "crash"
    (site / "slides").mkdir(parents=True)
    shutil.copy(site_40x / "slides" / "a40.svs", site / "slides")
    result = SitePreprocessor(_cfg(), _Crashing(encoder)).run(site)
    assert result.slides[0].status == "failed" and "simulated crash" in result.slides[0].reason
    for res in ("low", "high"):
        path = feature_path(site, ENC, res, "a40")
        assert not path.exists() and not [p.name for p in path.parent.iterdir() if "a40" in p.name]
    again = SitePreprocessor(_cfg(), encoder).run(site)
    assert again.slides[0].status == "done" and is_complete(feature_path(site, ENC, "high", "a40"))


def _white(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    return np.full((h, w, 3), 242, np.uint8)


def test_bad_slides_are_reported_and_the_rest_processed(
    processed: Path, real_dir: Path, nompp_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "bad"
    slides = site / "slides"
    shutil.copytree(processed / "slides", slides, ignore=shutil.ignore_patterns("CMU*", "a40*"))
    shutil.copytree(processed / "features", site / "features")  # g20 already done: must survive
    before = feature_path(site, ENC, "high", "g20").read_bytes()
    (slides / "notes.svs").write_text("not a slide at all")
    data = (real_dir / "CMU-1-Small-Region.svs").read_bytes()
    (slides / "truncated.svs").write_bytes(data[: len(data) // 2])
    shutil.copy(nompp_slide, slides / "nompp.tif")
    write_pyramidal_tiff(slides / "empty.tif", 2048, 2048, 0.5, "generic", _white)
    code = main(["preprocess", "--site", str(site), "--no-progress"])
    assert code == 3
    with (site / "features" / ENC / "failures.csv").open() as fh:
        failures = {row["slide_id"]: row["reason"] for row in csv.DictReader(fh)}
    assert set(failures) == {"notes", "truncated", "nompp", "empty"}
    assert "not a slide format" in failures["notes"]
    assert "truncated.svs" in failures["truncated"]
    assert "no resolution metadata" in failures["nompp"] and "--mpp" in failures["nompp"]
    assert "no tissue" in failures["empty"]
    assert feature_path(site, ENC, "high", "g20").read_bytes() == before
    leftovers = [
        p for p in (site / "features").rglob("*") if p.name.startswith(("notes", "truncated", "nompp", "empty"))
    ]
    assert leftovers == []
    assert "nompp" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_synth_then_low_only_preprocess_of_a_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cohort"
    code = main(
        [
            "synth",
            "--out",
            str(out),
            "--sites",
            "2",
            "--slides-per-site",
            "2",
            "--seed",
            "3",
            "--set",
            "slide-size-um=[700.0, 800.0]",
            "--set",
            "progress=false",
        ]
    )
    assert code == 0
    sites = sorted(p for p in out.iterdir() if p.is_dir())
    assert [s.name for s in sites] == ["site1", "site2"]
    args = ["preprocess", "--no-progress", "--resolutions", "low"]
    for s in sites:
        args += ["--site", str(s)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for s in sites:
        ids = [line.split(",")[0] for line in (s / "labels.csv").read_text().splitlines()[1:]]
        assert len(ids) == 2
        for slide_id in ids:
            bag = read_feature_file(feature_path(s, ENC, "low", slide_id), load_tokens=True)
            assert len(bag) > 0 and bag.tokens is not None
            assert not feature_path(s, ENC, "high", slide_id).exists()
        assert f"{s}: 2 done, 0 skipped, 0 failed" in printed


@pytest.mark.slow
def test_worker_processes_read_the_same_patches(
    processed: Path, tmp_path: Path, encoder: PatchEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small passes are read in-process; forcing DataLoader workers must give identical files."""
    monkeypatch.setattr("fedslide.client.encoding.WORKERS_FROM_PATCHES", 0)
    site = tmp_path / "workers"
    (site / "slides").mkdir(parents=True)
    shutil.copy(processed / "slides" / "g20.tif", site / "slides")
    summary = SitePreprocessor(_cfg(encoder={"num_workers": 2, "batch_size": 16}), encoder).run(site)
    assert summary.slides[0].status == "done"
    for res in ("low", "high"):
        ours = read_feature_file(feature_path(site, ENC, res, "g20"))
        ref = read_feature_file(feature_path(processed, ENC, res, "g20"))
        np.testing.assert_array_equal(ours.coords, ref.coords)
        np.testing.assert_allclose(ours.features, ref.features, atol=1e-4)
