"""Stain normalisation wherever pixels are encoded: the bundle carries the feature files' normaliser, predict
applies it, stage-1 fine-tuning reads and re-encodes patches with it, and a cohort that mixes normalisers is
refused naming the files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedslide.client import lowres_finetune
from fedslide.client.encoders import PatchEncoder
from fedslide.client.inference import load_bundle, predict_slide
from fedslide.client.lowres_finetune import collect_patches, finetuned_feature_path, reencode_site
from fedslide.client.preprocess import SitePreprocessor
from fedslide.client.synth.slide import write_slide
from fedslide.client.synth.stains import Stain
from fedslide.common.config.finetune import FinetuneConfig
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.distillation.bundle import BUNDLE_FILE, StudentBundle
from fedslide.common.distillation.data import load_sites
from fedslide.common.distillation.pipeline import bundle_meta
from fedslide.common.features import (
    STAIN_ATTR,
    FeatureFileError,
    feature_path,
    read_feature_file,
    shared_stain_identity,
)
from fedslide.common.models.registry import build_model
from tests.feature_sites import ENCODER, make_site

ENC = "efficientnet_lite0"  # the packaged encoder the slide tests preprocess with

SHIFTED = Stain(hematoxylin=(0.65, 0.70, 0.30), eosin=(0.10, 0.85, 0.45), h_scale=1.4, e_scale=0.7)
MACENKO = {"stain-normalize": "macenko"}  # torchstain's reference stain matrix: no image needed


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _identity(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs[STAIN_ATTR])


@pytest.fixture(scope="module")
def macenko_site(tmp_path_factory: pytest.TempPathFactory, effnet: PatchEncoder) -> Path:
    """Two small slides in a shifted stain, preprocessed with Macenko normalisation, labelled train / val."""
    site = tmp_path_factory.mktemp("stain_site")
    (site / "slides").mkdir()
    write_slide(site / "slides" / "s1.tif", 1000, 1000, 0.5, "generic", seed=3, tumor=True, stain=SHIFTED)
    write_slide(site / "slides" / "s2.tif", 700, 700, 0.5, "generic", seed=4, stain=SHIFTED)
    cfg = PreprocessConfig.model_validate(
        {"progress": False, "qc-images": False, "encoder": {"num_workers": 0, "batch_size": 16}, **MACENKO}
    )
    assert SitePreprocessor(cfg, effnet).run(site).count("done") == 2
    (site / "labels.csv").write_text("slide_id,label,split\ns1,tumor,train\ns2,normal,val\n")
    return site


def _bundle(site: Path, out: Path, encoder: str = ENCODER) -> StudentBundle:
    data = load_sites([site], encoder)
    model_cfg = ModelConfig(in_dim=data.feature_dim, hidden_dim=8, num_classes=2)
    bundle = StudentBundle(bundle_meta(data, "raw", None, {}), None, build_model(model_cfg), student_config=model_cfg)
    bundle.save(out)
    return bundle


def test_bundle_round_trip_carries_the_identity_and_old_bundles_mean_none(tmp_path: Path) -> None:
    ident = {"method": "reinhard", "min-tissue-fraction": 0.1, "lab-means": [1.0, 2.0, 3.0], "lab-stds": [1, 1, 1]}
    site = make_site(tmp_path, "a", {"train": 2, "val": 2}, seed=0, attrs={STAIN_ATTR: json.dumps(ident)})
    _bundle(site, tmp_path / "b")
    assert load_bundle(tmp_path / "b").meta.stain_normalization == ident
    doc = json.loads((tmp_path / "b" / BUNDLE_FILE).read_text())
    del doc["meta"]["stain_normalization"]  # a bundle written before the key existed
    (tmp_path / "b" / BUNDLE_FILE).write_text(json.dumps(doc))
    assert load_bundle(tmp_path / "b").meta.stain_normalization == {"method": "none"}
    plain = make_site(tmp_path, "p", {"train": 2, "val": 2}, seed=0)  # files that record no normaliser
    assert _bundle(plain, tmp_path / "p_b").meta.stain_normalization == {"method": "none"}


def test_low_and_high_files_that_disagree_are_refused_naming_the_files(tmp_path: Path) -> None:
    ident = {"method": "macenko", "min-tissue-fraction": 0.1}
    site = make_site(tmp_path, "a", {"train": 2, "val": 2}, seed=0, attrs={STAIN_ATTR: json.dumps(ident)})
    odd = feature_path(site, ENCODER, "high", "a_val_1")
    with h5py.File(odd, "r+") as f:
        f.attrs[STAIN_ATTR] = json.dumps({"method": "none"})
    with pytest.raises(FeatureFileError) as err:
        _bundle(site, tmp_path / "b")
    assert str(odd) in str(err.value) and "macenko" in str(err.value) and "a_train_0.h5" in str(err.value)
    with pytest.raises(FeatureFileError, match="not JSON"):
        shared_stain_identity([("x.h5", {STAIN_ATTR: "{broken"})])


def test_predict_applies_the_bundles_normaliser_as_preprocess_did(
    macenko_site: Path, effnet: PatchEncoder, tmp_path: Path
) -> None:
    bundle = _bundle(macenko_site, tmp_path / "b", ENC)
    assert bundle.meta.stain_normalization == _identity(feature_path(macenko_site, ENC, "low", "s1"))
    assert bundle.meta.stain_normalization["method"] == "macenko"
    cfg = PredictConfig.model_validate({"num_workers": 0, "batch_size": 16, "progress": False, "heatmaps": False})
    pred = predict_slide(macenko_site / "slides" / "s1.tif", load_bundle(tmp_path / "b"), effnet, cfg, keep_arrays=True)
    stored = read_feature_file(feature_path(macenko_site, ENC, "low", "s1"))
    assert pred.low_pass is not None and stored.coords is not None
    np.testing.assert_array_equal(pred.low_pass.coords, stored.coords)
    np.testing.assert_allclose(pred.low_pass.features, stored.features, atol=1e-3)
    # the same bundle without the normaliser sees other pixels: the check above could fail
    bundle.meta.stain_normalization = {"method": "none"}
    raw = predict_slide(macenko_site / "slides" / "s1.tif", bundle, effnet, cfg, keep_arrays=True)
    assert raw.low_pass is not None and not np.allclose(raw.low_pass.features, stored.features, atol=1e-2)


def _ft_cfg(**kw: object) -> FinetuneConfig:
    base: dict = {"progress": False, "epochs": 1, "batch_size": 2, "encoder": {"device": "cpu", "batch_size": 16}}
    return FinetuneConfig.model_validate({**base, **kw})


def test_reencoding_and_stage1_patches_use_the_sites_normaliser(
    macenko_site: Path, effnet: PatchEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    shutil.copytree(macenko_site / "slides", site / "slides")
    shutil.copytree(macenko_site / "features", site / "features")
    # re-encoding with the same (un-tuned) encoder must give back the preprocessed features: only if the patches
    # are normalised as they were then
    summary = reencode_site(site, _ft_cfg(), "unused.pt", encoder=effnet)
    assert summary.done == ["s1", "s2"]
    for sid in ("s1", "s2"):
        source = feature_path(site, ENC, "low", sid)
        target = finetuned_feature_path(site, ENC, effnet.weights_hash, sid)
        assert _identity(target) == _identity(source) and _identity(target)["method"] == "macenko"
        np.testing.assert_allclose(read_feature_file(target).features, read_feature_file(source).features, atol=1e-3)

    # stage 1: the teacher's targets on the (normalised) 20x children equal the stored 20x features
    monkeypatch.setattr(lowres_finetune, "_READ_CHUNK", 1)
    patches = collect_patches(site, _ft_cfg(max_patches_per_slide=1), effnet, [16], torch.device("cpu"))
    high = read_feature_file(feature_path(site, ENC, "high", "s1"))
    assert high.parent is not None and high.child is not None and patches.slides[0] == "s1"
    final = patches.final[0].float().numpy()
    matched = [
        np.allclose(final[high.child[rows]], high.features[rows], atol=0.02, rtol=0.02)
        for rows in (np.flatnonzero(high.parent == p) for p in np.unique(high.parent))
    ]
    assert sum(matched) == 1

    # a site whose 5x and 20x files disagree is refused before anything is read
    with h5py.File(feature_path(site, ENC, "high", "s2"), "r+") as f:
        f.attrs[STAIN_ATTR] = json.dumps({"method": "none"})
    with pytest.raises(FeatureFileError, match="s2.h5"):
        collect_patches(site, _ft_cfg(max_patches_per_slide=1), effnet, [16], torch.device("cpu"))
