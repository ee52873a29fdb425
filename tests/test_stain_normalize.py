"""Stain normalisation before encoding: moves shifted tiles toward the reference, falls back on blank tiles,
is part of the feature files' identity, refuses bad config values clearly, and runs on a real slide."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2lab

from fedslide.client.encoders import PatchEncoder, build_encoder
from fedslide.client.preprocess import SitePreprocessor
from fedslide.client.slides import SlideReader
from fedslide.client.stain_normalize import (
    STAIN_ATTR,
    StainReferenceError,
    build_stain_normalizer,
    mean_stain_vectors,
    stain_normalizer_from_identity,
    stained_fraction,
)
from fedslide.client.synth.slide import write_slide
from fedslide.client.synth.stains import Stain
from fedslide.common.config.base import ConfigError, load_config
from fedslide.common.config.preprocess import EncoderConfig, PreprocessConfig
from fedslide.common.features import feature_path, read_feature_file
from fedslide.deploy.cli import main

# A strongly shifted H&E: bluer haematoxylin, pinker eosin, more haematoxylin and less eosin than the reference.
SHIFTED = Stain(hematoxylin=(0.65, 0.70, 0.30), eosin=(0.10, 0.85, 0.45), h_scale=1.4, e_scale=0.7)
SIDE = 1536  # px read at 0.5 µm/px from each synthetic slide: 6 × 6 tiles of 256 px


def _cfg(**kw: object) -> PreprocessConfig:
    base: dict = {"progress": False, "qc-images": False, "encoder": {"num_workers": 0, "batch_size": 16}}
    base.update(kw)
    return PreprocessConfig.model_validate(base)


def _tiles(path: Path) -> np.ndarray:
    """The 36 tiles [36, 3, 256, 256] of the slide's top-left SIDE × SIDE px at 0.5 µm/px."""
    with SlideReader(path, None, 0.05) as slide:
        img = slide.read_region(0, 0, 0.5, SIDE)
    grid = [img[y : y + 256, x : x + 256] for y in range(0, SIDE, 256) for x in range(0, SIDE, 256)]
    return np.ascontiguousarray(np.stack(grid).transpose(0, 3, 1, 2))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """torch on one thread here (restored after): per-tile stain fits are small, and on a busy 2-core machine a
    second thread only adds contention (as in the DataLoader workers that run them in production)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tissue stained as the reference and strongly shifted, plus a reference PNG cut from the former."""
    root = tmp_path_factory.mktemp("stain")
    ref = write_slide(root / "ref.tif", 800, 800, 0.5, "generic", seed=3)
    shifted = write_slide(root / "shifted.tif", 800, 800, 0.5, "generic", seed=3, stain=SHIFTED)
    with SlideReader(ref, None, 0.05) as slide:
        Image.fromarray(slide.read_region(0, 0, 0.5, 768)).save(root / "reference.png")
    return {"ref": ref, "shifted": shifted, "png": root / "reference.png", "root": root}


@pytest.fixture(scope="module")
def encoder() -> PatchEncoder:
    return build_encoder(EncoderConfig())


def _lab_means(images: np.ndarray) -> np.ndarray:
    """CIELAB channel means [B, 3] of RGB uint8 images [B, 3, H, W]."""
    return np.stack([rgb2lab(im[:, ::2, ::2].transpose(1, 2, 0)).reshape(-1, 3).mean(axis=0) for im in images])


def test_macenko_moves_shifted_tiles_toward_reference(slides: dict[str, Path]) -> None:
    ref, shifted = _tiles(slides["ref"]), _tiles(slides["shifted"])
    norm = build_stain_normalizer(_cfg(**{"stain-normalize": "macenko", "stain-reference": {"image": slides["png"]}}))
    assert norm is not None
    out, fell_back = norm(shifted)
    target = mean_stain_vectors(ref)
    before = np.linalg.norm(mean_stain_vectors(shifted) - target)
    after = np.linalg.norm(mean_stain_vectors(out[~fell_back]) - target)
    assert before > 0.1  # the shift is real
    assert after < before / 3, (before, after)
    assert 0 < fell_back.sum() < len(shifted)  # background tiles exist in the corner and are left as read
    assert np.array_equal(out[fell_back], shifted[fell_back])
    assert not np.array_equal(out[~fell_back], shifted[~fell_back])


def test_reinhard_matches_each_tile_to_the_reference_lab_statistics(slides: dict[str, Path]) -> None:
    shifted = _tiles(slides["shifted"])
    norm = build_stain_normalizer(_cfg(**{"stain-normalize": "reinhard", "stain-reference": {"image": slides["png"]}}))
    assert norm is not None
    out, fell_back = norm(shifted)
    keep = ~fell_back
    assert keep.sum() >= 10
    target = _lab_means(np.asarray(Image.open(slides["png"]).convert("RGB")).transpose(2, 0, 1)[None])[0]
    before = np.linalg.norm(_lab_means(shifted[keep]) - target, axis=1)
    after = np.linalg.norm(_lab_means(out[keep]) - target, axis=1)
    assert np.median(after) < np.median(before) / 3, (before, after)


def test_inline_reference_equals_fitted_reference(slides: dict[str, Path]) -> None:
    fitted = build_stain_normalizer(_cfg(**{"stain-normalize": "macenko", "stain-reference": {"image": slides["png"]}}))
    assert fitted is not None
    ident = fitted.identity()
    inline = build_stain_normalizer(
        _cfg(
            **{
                "stain-normalize": "macenko",
                "stain-reference": {
                    "stain-matrix": ident["stain-matrix"],
                    "max-concentrations": ident["max-concentrations"],
                },
            }
        )
    )
    assert inline is not None and inline.identity() == ident
    rebuilt = stain_normalizer_from_identity(json.loads(json.dumps(ident)))  # as read back from a feature file
    assert rebuilt is not None and rebuilt.identity() == ident
    assert stain_normalizer_from_identity({"method": "none"}) is None
    tiles = _tiles(slides["shifted"])[:12]
    a, fa = fitted(tiles)
    b, fb = inline(tiles)
    assert np.array_equal(fa, fb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_blank_and_failing_tiles_fall_back(slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    norm = build_stain_normalizer(_cfg(**{"stain-normalize": "macenko"}))  # torchstain's default reference
    assert norm is not None
    white = np.full((1, 3, 64, 64), 245, np.uint8)
    out, fell_back = norm(white)
    assert fell_back.tolist() == [True] and np.array_equal(out, white)
    stained = _tiles(slides["shifted"])
    tissue = stained[[int(np.argmax([stained_fraction(t)[0] for t in stained]))]]
    assert norm(tissue)[1].tolist() == [False]

    def broken(*_: object, **__: object) -> None:
        raise torch.linalg.LinAlgError("eigh did not converge")

    monkeypatch.setattr(norm._impl, "normalize", broken)
    out, fell_back = norm(tissue)
    assert fell_back.tolist() == [True] and np.array_equal(out, tissue)


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ('stain-normalize = "macenk"\n', ["stain-normalize", "'macenk'", "'none', 'macenko' or 'reinhard'"]),
        ('stain-normalize = "reinhard"\n', ["stain-reference.image", "stain-reference.lab-means", "reinhard"]),
        (
            'stain-normalize = "macenko"\n[preprocess.stain-reference]\nstain-matrix = [[0.6, 0.2], [0.7, 0.8], '
            "[0.4, 0.5]]\n",
            ["stain-reference.stain-matrix", "stain-reference.max-concentrations"],
        ),
        (
            'stain-normalize = "macenko"\n[preprocess.stain-reference]\nlab-means = [60, 20, -10]\n',
            ["stain-reference.lab-means", "'macenko'", "reinhard"],
        ),
        (
            'stain-normalize = "macenko"\n[preprocess.stain-reference]\nstain-matrix = [[0.6, 0.2], [0.7, 0.8], '
            "[0.4, -0.5]]\nmax-concentrations = [1.9, 1.0]\n",
            ["stain-reference.stain-matrix", "-0.5", "positive"],
        ),
        (
            'stain-normalize = "reinhard"\n[preprocess.stain-reference]\nlab-means = [60, 20, -10]\n'
            "lab-stds = [10, 0, 5]\n",
            ["stain-reference.lab-stds", "greater than 0"],
        ),
    ],
)
def test_bad_config_values_name_file_key_value_and_allowed(tmp_path: Path, body: str, needles: list[str]) -> None:
    path = tmp_path / "site.toml"
    path.write_text("[preprocess]\n" + body)
    with pytest.raises(ConfigError) as err:
        load_config(PreprocessConfig, path, "preprocess")
    for needle in [str(path), *needles]:
        assert needle in str(err.value), str(err.value)


def test_unusable_reference_image_names_key_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(StainReferenceError, match=r"preprocess\.stain-reference\.image = .*nope\.png.*no such file"):
        build_stain_normalizer(_cfg(**{"stain-normalize": "macenko", "stain-reference": {"image": missing}}))
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((128, 128, 3), 250, np.uint8)).save(blank)
    with pytest.raises(StainReferenceError, match=r"blank\.png.*0 stained pixels"):
        build_stain_normalizer(_cfg(**{"stain-normalize": "reinhard", "stain-reference": {"image": blank}}))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(StainReferenceError, match=r"garbage\.png.*cannot read it as an RGB image"):
        build_stain_normalizer(_cfg(**{"stain-normalize": "macenko", "stain-reference": {"image": garbage}}))


def test_normaliser_and_its_reference_change_the_settings_hash(slides: dict[str, Path], encoder: PatchEncoder) -> None:
    configs = [
        _cfg(),
        _cfg(**{"stain-normalize": "macenko", "stain-reference": {"image": slides["png"]}}),
        _cfg(**{"stain-normalize": "macenko"}),  # torchstain's default reference
        _cfg(**{"stain-normalize": "macenko", "stain-reference": {"min-tissue-fraction": 0.2}}),
        _cfg(**{"stain-normalize": "reinhard", "stain-reference": {"image": slides["png"]}}),
    ]
    for res in ("low", "high"):
        hashes = [SitePreprocessor(c, encoder).settings_hash(res) for c in configs]
        assert len(set(hashes)) == len(configs), hashes
    moved = slides["root"] / "moved.png"  # the same reference under another name is the same normaliser
    shutil.copy(slides["png"], moved)
    same = _cfg(**{"stain-normalize": "macenko", "stain-reference": {"image": moved}})
    assert SitePreprocessor(same, encoder).settings_hash("low") == SitePreprocessor(configs[1], encoder).settings_hash(
        "low"
    )


def test_normaliser_is_written_into_feature_files_and_forces_redo(
    slides: dict[str, Path], encoder: PatchEncoder, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    (site / "slides").mkdir(parents=True)
    shutil.copy(slides["shifted"], site / "slides" / "s.tif")
    plain = SitePreprocessor(_cfg(), encoder)
    # a high stain floor, so that some kept tiles (tissue on a quarter of them) fall back and are counted
    ref = {"image": slides["png"], "min-tissue-fraction": 0.5}
    macenko = SitePreprocessor(_cfg(**{"stain-normalize": "macenko", "stain-reference": ref}), encoder)

    assert plain.run(site).slides[0].status == "done"
    before = {r: read_feature_file(feature_path(site, encoder.name, r, "s")) for r in ("low", "high")}
    assert json.loads(before["low"].attrs[STAIN_ATTR]) == {"method": "none"}
    assert plain.run(site).slides[0].status == "skipped"

    result = macenko.run(site).slides[0]
    assert result.status == "done"  # a changed normaliser redoes the slide, as a changed encoder does
    assert result.patches_high > 0 and result.patches_low > 0
    assert 0 <= result.stain_fallback_low <= result.patches_low
    assert 0 < result.stain_fallback_high < result.patches_high  # corner background tiles fall back, tissue not
    summary = json.loads((site / "features" / encoder.name / "summary.json").read_text())
    assert summary["slides"][0]["stain_fallback_high"] == result.stain_fallback_high
    for res in ("low", "high"):
        path = feature_path(site, encoder.name, res, "s")
        with h5py.File(path, "r") as f:
            recorded = json.loads(f.attrs[STAIN_ATTR])
            assert f.attrs["config_hash"] == macenko.settings_hash(res)
        assert macenko.stain is not None and recorded == macenko.stain.identity()
        after = read_feature_file(path)
        assert np.array_equal(after.coords, before[res].coords)
        assert not np.allclose(after.features, before[res].features)  # the encoder saw normalised pixels
    assert macenko.run(site).slides[0].status == "skipped"


def test_real_slide_preprocesses_with_macenko(real_dir: Path, encoder: PatchEncoder, tmp_path: Path) -> None:
    site = tmp_path / "real"
    (site / "slides").mkdir(parents=True)
    shutil.copy(real_dir / "CMU-1-Small-Region.svs", site / "slides")
    pre = SitePreprocessor(_cfg(**{"stain-normalize": "macenko"}), encoder)
    result = pre.run(site).slides[0]
    assert result.status == "done", result.reason
    assert result.patches_low > 0 and result.patches_high > 0
    assert result.stain_fallback_high < result.patches_high  # real H&E tissue is normalised, not skipped
    for res in ("low", "high"):
        bag = read_feature_file(feature_path(site, encoder.name, res, "CMU-1-Small-Region"))
        assert json.loads(bag.attrs[STAIN_ATTR])["method"] == "macenko"
        assert np.isfinite(bag.features).all()


def test_cli_reports_an_unusable_reference_as_a_configuration_error(
    slides: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site"
    (site / "slides").mkdir(parents=True)
    shutil.copy(slides["ref"], site / "slides" / "r.tif")
    missing = tmp_path / "missing.png"
    args = ["preprocess", "--site", str(site), "--no-progress", "--set", "stain-normalize=macenko"]
    assert main([*args, "--set", f"stain-reference.image={missing}"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "preprocess.stain-reference.image" in err and str(missing) in err
    assert not (site / "features").exists()
