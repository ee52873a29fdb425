"""A student bundle trained on a fine-tuned 5x encoder: it carries (or names) the weights, predict uses them,
and features or weights of any other encoder are refused with both hashes named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedslide.client.encoders import PatchEncoder, build_encoder
from fedslide.client.inference import ModelDirError, load_bundle, load_encoder, predict_slide, predict_slides
from fedslide.client.synth.slide import write_slide
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.preprocess import EncoderConfig
from fedslide.common.distillation.bundle import (
    LOW_ENCODER_FILE,
    BundleMismatchError,
    StudentBundle,
    find_low_encoder_weights,
)
from fedslide.common.distillation.data import detect_encoder, load_sites
from fedslide.common.distillation.pipeline import bundle_meta
from tests.feature_sites import ENCODER, HASH, make_site, tiny_student_bundle

CLASSES = ["normal", "tumor"]


@pytest.fixture(scope="module")
def base() -> PatchEncoder:
    return build_encoder(EncoderConfig())


@pytest.fixture(scope="module")
def finetuned_weights(base: PatchEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'fine-tuned' EfficientNet-Lite0 weights file as `fedslide finetune` writes it (a perturbed state_dict)."""
    gen = torch.Generator().manual_seed(0)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in base.state_dict().items()
    }
    path = tmp_path_factory.mktemp("site") / "finetune" / f"{base.name}.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def finetuned(finetuned_weights: Path) -> PatchEncoder:
    return build_encoder(EncoderConfig(weights=finetuned_weights))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ft_slides") / "s1.tif"
    write_slide(path, 1000, 1000, 0.5, "generic", seed=3, tumor=True, tumor_fraction=0.4)
    return path


def _bundle(base: PatchEncoder, finetuned: PatchEncoder, weights: Path | None) -> StudentBundle:
    return tiny_student_bundle(
        base,
        CLASSES,
        weights=weights,
        low_encoder_weights_hash=finetuned.weights_hash,
        low_encoder_fingerprint=finetuned.fingerprint,
    )


def _cfg(**kw: object) -> PredictConfig:
    return PredictConfig.model_validate(
        {"num_workers": 0, "batch_size": 16, "progress": False, "heatmaps": False, **kw}
    )


def test_bundle_refuses_features_of_another_encoder_naming_both_hashes(
    base: PatchEncoder, finetuned: PatchEncoder, finetuned_weights: Path
) -> None:
    bundle = _bundle(base, finetuned, finetuned_weights)
    low = {"resolution": "low", "encoder_name": base.name, "encoder_dim": base.dim}
    bundle.check_features({**low, "encoder_weights_hash": finetuned.weights_hash})  # its own 5x features pass
    bundle.check_features({**low, "resolution": "high", "encoder_weights_hash": base.weights_hash})
    with pytest.raises(BundleMismatchError) as err:  # frozen-encoder 5x features: refused
        bundle.check_features({**low, "encoder_weights_hash": base.weights_hash})
    assert finetuned.weights_hash[:12] in str(err.value) and base.weights_hash[:12] in str(err.value)
    with pytest.raises(BundleMismatchError) as err:  # the teacher's 20x features must stay frozen-encoder ones
        bundle.check_features({**low, "resolution": "high", "encoder_weights_hash": finetuned.weights_hash})
    assert finetuned.weights_hash[:12] in str(err.value) and base.weights_hash[:12] in str(err.value)


def test_bundle_carries_the_weights_and_refuses_other_weights(
    base: PatchEncoder, finetuned: PatchEncoder, finetuned_weights: Path, tmp_path: Path
) -> None:
    _bundle(base, finetuned, finetuned_weights).save(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.low_encoder_weights == tmp_path / "b" / LOW_ENCODER_FILE
    assert load_encoder(loaded, _cfg(), "low").weights_hash == finetuned.weights_hash
    assert load_encoder(loaded, _cfg()).weights_hash == base.weights_hash
    other = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(1)}, other)
    (tmp_path / "b" / LOW_ENCODER_FILE).write_bytes(other.read_bytes())  # swapped file: refused on load
    with pytest.raises(ModelDirError, match=finetuned.weights_hash[:12]):
        load_bundle(tmp_path / "b")
    # hash only: the site supplies the file; a wrong one is refused naming both hashes
    _bundle(base, finetuned, None).save(tmp_path / "h")
    hash_only = load_bundle(tmp_path / "h")
    assert not (tmp_path / "h" / LOW_ENCODER_FILE).exists()
    with pytest.raises(ModelDirError, match="--low-weights"):
        load_encoder(hash_only, _cfg(), "low")
    with pytest.raises(BundleMismatchError) as err:
        load_encoder(hash_only, _cfg(low_encoder_weights=other), "low")
    assert finetuned.weights_hash[:12] in str(err.value)
    site_encoder = load_encoder(hash_only, _cfg(low_encoder_weights=finetuned_weights), "low")
    assert site_encoder.weights_hash == finetuned.weights_hash
    assert find_low_encoder_weights(hash_only.meta, [finetuned_weights.parent.parent]) == finetuned_weights


def test_predict_encodes_5x_with_the_bundles_finetuned_encoder(
    base: PatchEncoder, finetuned: PatchEncoder, finetuned_weights: Path, slide: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    _bundle(base, finetuned, finetuned_weights).save(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    run = predict_slides([slide], tmp_path / "b", tmp_path / "out", _cfg())
    assert not run.failures
    assert run.encoder["weights_hash"] == finetuned.weights_hash
    direct = predict_slide(slide, bundle, finetuned, _cfg(), keep_arrays=True)
    frozen = predict_slide(slide, bundle, base, _cfg(), keep_arrays=True)
    np.testing.assert_allclose(run.predictions[0].probs, direct.probs, rtol=1e-5, atol=1e-6)
    assert direct.low_pass is not None and frozen.low_pass is not None
    assert not np.allclose(direct.low_pass.features, frozen.low_pass.features, atol=1e-3)
    with pytest.raises(BundleMismatchError, match=base.weights_hash[:12]):  # the frozen encoder as the 5x one
        predict_slides([slide], bundle, tmp_path / "out2", _cfg(), low_encoder=base)


def test_distill_feature_detection_skips_finetuned_folders(tmp_path: Path) -> None:
    for name in ("efficientnet_lite0", "efficientnet_lite0-finetuned"):
        (tmp_path / "features" / name / "low").mkdir(parents=True)
    assert detect_encoder([tmp_path]) == "efficientnet_lite0"


def test_distill_reads_finetuned_low_features_and_the_bundle_records_both_hashes(tmp_path: Path) -> None:
    site = make_site(tmp_path / "a", "s", {"train": 2, "val": 2}, seed=0)
    other = make_site(tmp_path / "b", "s", {"train": 2, "val": 2}, seed=0, weights_hash="ffff0000ffff")
    (site / "features" / f"{ENCODER}-finetuned").mkdir()
    (other / "features" / ENCODER / "low").rename(site / "features" / f"{ENCODER}-finetuned" / "low")
    assert load_sites([site]).low_attrs["encoder_weights_hash"] == HASH  # default: the encoder's own folder
    data = load_sites([site], low_features=f"{ENCODER}-finetuned")
    assert data.low_attrs["encoder_weights_hash"] == "ffff0000ffff"
    meta = bundle_meta(data, "raw", None, {})
    assert meta.encoder_weights_hash == HASH and meta.low_encoder_weights_hash == "ffff0000ffff"
    assert meta.low_finetuned
