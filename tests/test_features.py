"""The h5 feature-file format: schema, atomic writes, completeness marker, CLAM/TRIDENT files."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from fedslide.common.features import (
    FeatureFileError,
    FeatureMeta,
    FeatureWriter,
    feature_path,
    is_complete,
    read_feature_file,
)


def _meta(dim: int = 8, token_grid: int = 0, chash: str = "abc") -> FeatureMeta:
    return FeatureMeta(
        slide_id="s1",
        resolution="high",
        encoder_name="enc",
        encoder_weights_hash="f" * 64,
        encoder_dim=dim,
        patch_size=256,
        patch_size_level0=512,
        target_mpp=0.5,
        target_magnification=20.0,
        slide_mpp=0.25,
        level0_magnification=40.0,
        config_hash=chash,
        token_grid=token_grid,
        extra={"child_grid": 4},
    )


def test_roundtrip_with_parent_child_and_attrs(tmp_path: Path) -> None:
    path = feature_path(tmp_path, "enc", "high", "s1")
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(10, 8)).astype(np.float32)
    coords = rng.integers(0, 1000, size=(10, 2))
    with FeatureWriter(path, _meta(), with_parent=True) as w:
        w.append(feats[:6], coords[:6], parent=np.arange(6) // 4, child=np.arange(6) % 4)
        w.append(feats[6:], coords[6:], parent=np.arange(6, 10) // 4, child=np.arange(6, 10) % 4)
    assert path == tmp_path / "features" / "enc" / "high" / "s1.h5"
    bag = read_feature_file(path)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_array_equal(bag.parent, np.arange(10) // 4)
    np.testing.assert_array_equal(bag.child, np.arange(10) % 4)
    assert bag.attrs["encoder_name"] == "enc" and bag.attrs["encoder_dim"] == 8
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["child_grid"] == 4
    with h5py.File(path) as f:  # TRIDENT keeps the patching attributes on `coords`
        assert f["coords"].attrs["patch_size"] == 256
        assert f["coords"].attrs["target_magnification"] == 20.0
    assert is_complete(path, "abc")
    assert not is_complete(path, "other-settings")


def test_tokens_stored_half_precision(tmp_path: Path) -> None:
    path = tmp_path / "low.h5"
    tokens = np.random.default_rng(1).normal(size=(3, 16, 8)).astype(np.float32)
    with FeatureWriter(path, _meta(token_grid=4), with_tokens=True) as w:
        w.append(tokens.mean(axis=1), np.zeros((3, 2)), tokens=tokens)
    with h5py.File(path) as f:
        assert f["tokens"].dtype == np.float16 and f["tokens"].shape == (3, 16, 8)
    bag = read_feature_file(path, load_tokens=True)
    np.testing.assert_allclose(bag.tokens, tokens, atol=1e-2)


def test_crash_mid_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s1.h5"
    with pytest.raises(RuntimeError):
        with FeatureWriter(path, _meta()) as w:
            w.append(np.ones((2, 8)), np.zeros((2, 2)))
            raise RuntimeError("killed")
    assert not path.exists()
    assert not list(tmp_path.iterdir())  # nor its temp file


def test_wrong_dim_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FeatureFileError, match="dim 5, expected 8"):
        with FeatureWriter(tmp_path / "x.h5", _meta()) as w:
            w.append(np.ones((2, 5)), np.zeros((2, 2)))


def test_files_without_marker_are_not_complete_but_readable(tmp_path: Path) -> None:
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as f:  # as CLAM's extract_features_fp writes them
        f["features"] = np.ones((4, 1024), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
    assert not is_complete(clam)
    bag = read_feature_file(clam)
    assert bag.features.shape == (4, 1024) and bag.coords.shape == (4, 2) and bag.parent is None
    nocoords = tmp_path / "bag.h5"
    with h5py.File(nocoords, "w") as f:
        f["features"] = np.ones((3, 16), np.float32)
    assert read_feature_file(nocoords).coords is None


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(FeatureFileError, match="junk.h5"):
        read_feature_file(junk)
    assert not is_complete(junk)
    nofeat = tmp_path / "nofeat.h5"
    with h5py.File(nofeat, "w") as f:
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(FeatureFileError, match="no 'features' dataset"):
        read_feature_file(nofeat)
