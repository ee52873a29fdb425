"""Each fine-tuned encoder has its own feature folder (named from its weights hash), found again from a bundle; VIB
fine-tunes on the training split only; a bundle's own encoder file conflicts loudly with predict's weights options."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedslide.client.inference import load_bundle
from fedslide.client.inference.model import encoder_config, low_encoder_weights
from fedslide.client.site_run import STAGE1_RECORD, SiteRun
from fedslide.client.vib_finetune import site_bags, train_slide_ids
from fedslide.common.config.base import ConfigError
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.vib import VIBConfig
from fedslide.common.distillation.bundle import BundleMismatchError, StudentBundle, file_sha256
from fedslide.common.distillation.data import detect_encoder, load_sites
from fedslide.common.distillation.feature_folders import (
    finetuned_features_name,
    find_finetuned_features,
    is_finetuned_features,
)
from fedslide.deploy.study.heatmaps import bundle_slide, render_slide_heatmap
from tests.feature_sites import D, ENCODER, HASH, make_site, tiny_student_bundle

H1, H2 = "1" * 64, "2" * 64
CLASSES = ["neg", "pos"]


def test_folder_names_come_from_the_weights_hash() -> None:
    digest = "ABCDEF0123456789" + "0" * 48
    assert finetuned_features_name("uni", digest) == "uni-ft-abcdef012345"
    assert finetuned_features_name("uni", digest, "vib") == "uni-vib-abcdef012345"
    with pytest.raises(ValueError, match="'not-a-hash'.*'uni'"):
        finetuned_features_name("uni", "not-a-hash")
    for name in ("uni-ft-abcdef012345", "uni-vib-abcdef012345", "uni-finetuned", "uni-vib-finetuned"):
        assert is_finetuned_features(name), name
    for name in ("uni", "uni-ft", "uni-ft-abcdef01234", "uni-ft-abcdef012345x", "vit-ft-xyz"):
        assert not is_finetuned_features(name), name


def test_feature_detection_skips_every_fine_tuned_folder(tmp_path: Path) -> None:
    for name in (
        "efficientnet_lite0",
        "efficientnet_lite0-finetuned",
        finetuned_features_name("efficientnet_lite0", H1),
    ):
        (tmp_path / "features" / name / "low").mkdir(parents=True)
    (tmp_path / "features" / finetuned_features_name("efficientnet_lite0", H2, "vib") / "high").mkdir(parents=True)
    assert detect_encoder([tmp_path]) == "efficientnet_lite0"


def _fold_folder(site: Path, root: Path, weights_hash: str) -> str:
    """Another fold's fine-tuned 5x files of the site's slides, in their own folder."""
    other = make_site(root, site.name, {"train": 2, "val": 2, "test": 2}, seed=0, weights_hash=weights_hash)
    name = finetuned_features_name(ENCODER, weights_hash)
    (site / "features" / name).mkdir()
    (other / "features" / ENCODER / "low").rename(site / "features" / name / "low")
    return name


def _bundle(low_hash: str | None) -> StudentBundle:
    encoder = SimpleNamespace(name=ENCODER, dim=D, weights_hash=HASH, fingerprint=f"fp-{ENCODER}-{HASH}")
    if low_hash is None:
        return tiny_student_bundle(encoder, CLASSES)
    fingerprint = f"fp-{ENCODER}-{low_hash}"
    return tiny_student_bundle(encoder, CLASSES, low_encoder_weights_hash=low_hash, low_encoder_fingerprint=fingerprint)


def test_heatmaps_read_the_5x_files_of_the_bundles_own_encoder(tmp_path: Path) -> None:
    site = make_site(tmp_path / "cohort", "site1", {"train": 2, "val": 2, "test": 2}, seed=0)
    folders = {h: _fold_folder(site, tmp_path / h[:4], h) for h in (H1, H2)}  # two folds' files side by side
    assert find_finetuned_features(site, ENCODER, H1) == folders[H1] != folders[H2]
    slide = load_sites([site]).slides[0]  # as the study reads it: the site's own encoder folder
    assert slide.low.attrs["encoder_weights_hash"] == HASH
    for weights_hash in (H1, H2):
        bundle = _bundle(weights_hash)
        with pytest.raises(BundleMismatchError):
            bundle.check_features(slide.low.attrs)
        found = bundle_slide(bundle, slide, site)
        assert found.low.attrs["encoder_weights_hash"] == weights_hash
        assert found.low.path.parent.parent.name == folders[weights_hash]
        bundle.check_features(found.low.attrs)
        info = render_slide_heatmap(
            bundle, slide, site, tmp_path / f"{weights_hash[:4]}.png", source="t", true_label="neg"
        )
        assert (tmp_path / f"{weights_hash[:4]}.png").is_file() and info["thumbnail"] == "canvas"
    assert bundle_slide(_bundle(None), slide, site) is slide  # a frozen-encoder bundle reads the site's own files
    gone = _bundle("3" * 64)  # no folder of those weights at this site: refused, naming both encoders
    with pytest.raises(BundleMismatchError, match="333333333333"):
        render_slide_heatmap(gone, slide, site, tmp_path / "gone.png", source="t", true_label="neg")


def _vib_cfg(**kw: object) -> VIBConfig:
    return VIBConfig.model_validate({"progress": False, "encoder": {"name": ENCODER}, **kw})


def _with_slide_files(site: Path) -> Path:
    (site / "slides").mkdir()
    for low in (site / "features" / ENCODER / "low").glob("*.h5"):
        (site / "slides" / f"{low.stem}.tif").write_bytes(b"")  # never opened: site_bags reads features only
    return site


def test_vib_fine_tunes_on_the_training_split_only(tmp_path: Path) -> None:
    site = _with_slide_files(make_site(tmp_path, "s", {"train": 4, "val": 2, "test": 2}, seed=0))
    train = {f"s_train_{i}" for i in range(4)}
    assert {b.slide_id for b in site_bags(site, _vib_cfg()).bags} == train  # no val, no test labels
    assert train_slide_ids(site, _vib_cfg(sample_test_slides=True)) == train | {"s_test_0", "s_test_1"}
    assert {b.slide_id for b in site_bags(site, _vib_cfg(), slide_ids={"s_train_1"}).bags} == {"s_train_1"}


def test_vib_leaves_out_the_validation_split_carved_later(tmp_path: Path) -> None:
    # labels.csv records no val slides: the run carves them from the training slides, and VIB must not train on them
    site = _with_slide_files(make_site(tmp_path, "s", {"train": 8, "test": 2}, seed=0))
    data = load_sites([site], seed=5)
    val = {data.slides[int(i)].slide_id for i in data.split("val")}
    ids = {b.slide_id for b in site_bags(site, _vib_cfg(seed=5)).bags}
    assert val and not ids & val and ids == {data.slides[int(i)].slide_id for i in data.split("train")}


def _predict_cfg(**kw: object) -> PredictConfig:
    return PredictConfig.model_validate({"progress": False, "heatmaps": False, **kw})


def test_predict_weights_other_than_the_bundles_own_file_are_refused(tmp_path: Path) -> None:
    own, same, other = tmp_path / "own.pt", tmp_path / "same.pt", tmp_path / "other.pt"
    torch.save({"w": torch.ones(3)}, own)
    same.write_bytes(own.read_bytes())
    torch.save({"w": torch.zeros(3)}, other)
    low_bundle = _bundle(file_sha256(own))
    parts = (low_bundle.meta, low_bundle.adapter, low_bundle.student, low_bundle.teacher)
    StudentBundle(*parts, low_bundle.student_config, low_bundle.teacher_config, own).save(tmp_path / "low")
    low = load_bundle(tmp_path / "low")
    assert low.low_encoder_weights is not None
    for given in (None, same):  # no option, or the same bytes: the bundle's file
        assert low_encoder_weights(low, _predict_cfg(low_encoder_weights=given)) == low.low_encoder_weights
    with pytest.raises(ConfigError) as err:
        low_encoder_weights(low, _predict_cfg(low_encoder_weights=other))
    message = str(err.value)
    assert "predict.low-encoder-weights (--low-weights)" in message and str(other) in message
    assert file_sha256(other)[:12] in message and file_sha256(own)[:12] in message and "low_encoder.pt" in message

    both = _bundle(None)
    both.meta.encoder_weights_hash = file_sha256(own)
    parts = (both.meta, both.adapter, both.student, both.teacher, both.student_config, both.teacher_config)
    StudentBundle(*parts, encoder_weights=own).save(tmp_path / "both")
    bundle = load_bundle(tmp_path / "both")
    for resolution in ("high", "low"):
        for given in (None, same):
            assert encoder_config(bundle, _predict_cfg(encoder_weights=given), resolution).weights == (
                bundle.encoder_weights
            )
        with pytest.raises(ConfigError, match=r"predict\.encoder-weights \(--weights\).*encoder\.pt") as err:
            encoder_config(bundle, _predict_cfg(encoder_weights=other), resolution)
        assert file_sha256(other)[:12] in str(err.value) and file_sha256(own)[:12] in str(err.value)
    with pytest.raises(ConfigError, match="is not a file"):
        encoder_config(bundle, _predict_cfg(encoder_weights=tmp_path / "missing.pt"), "high")


def test_two_runs_at_a_site_each_read_their_own_fine_tuned_files(tmp_path: Path) -> None:
    # two LOSO folds (two runs) fine-tuned different 5x encoders at this site: each run still reads its own files
    site = make_site(tmp_path / "cohort", "site1", {"train": 2, "val": 2, "test": 2}, seed=0)
    cfg = FederationConfig(pixel_stage1=True)
    for weights_hash in (H1, H2):
        name = _fold_folder(site, tmp_path / weights_hash[:4], weights_hash)
        run_dir = tmp_path / "runs" / weights_hash[:4]
        (run_dir / STAGE1_RECORD).parent.mkdir(parents=True)
        (run_dir / STAGE1_RECORD).write_text(json.dumps({"weights_hash": weights_hash, "features": name}))
    for weights_hash in (H1, H2):
        run = SiteRun(site, tmp_path / "runs" / weights_hash[:4], cfg, "site1")
        data = run.data()
        assert data.encoder == ENCODER  # fine-tuned folders never count as the site's encoder
        assert data.low_attrs["encoder_weights_hash"] == weights_hash
        assert data.high_attrs["encoder_weights_hash"] == HASH
