"""Feature files as CLAM and TRIDENT leave them: found, read, paired, and used by train and distill."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedslide.common.config.base import ConfigError
from fedslide.common.config.layout import SITE_LAYOUT_FILE, FeatureLayoutConfig
from fedslide.common.distillation.data import DistillData, detect_encoder, load_sites
from fedslide.common.feature_layouts import locate, locate_folder, pair_bags, read_bag
from fedslide.common.features import FeatureBag, FeatureFileError, read_feature_file
from fedslide.common.training.cohort import load_cohort
from fedslide.common.training.errors import FeatureDataError
from fedslide.common.training.labels import read_labels
from tests.feature_sites import D, ENCODER, GRID, make_site

TRIDENT_HIGH, TRIDENT_LOW = "20x_256px_0px_overlap", "5x_256px_0px_overlap"


def _fedslide_files(site: Path, resolution: str) -> list[Path]:
    return sorted((site / "features" / ENCODER / resolution).glob("*.h5"))


def _write_h5(path: Path, features: np.ndarray, coords: np.ndarray, coord_attrs: dict[str, object]) -> None:
    """An h5 file as TRIDENT/CLAM write one: `features`, `coords` (int32 in CLAM), attributes on `coords` only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features.astype(np.float32))
        f.create_dataset("coords", data=coords)
        for key, value in coord_attrs.items():
            f["coords"].attrs[key] = value


def to_trident(site: Path, rng: np.random.Generator, encoder: str = "uni_v1") -> None:
    """Rewrite a fedslide site as a TRIDENT job (rows shuffled, no parent/child) and declare it in features.toml."""
    for res, folder, size0, mag in (("high", TRIDENT_HIGH, 256, 20), ("low", TRIDENT_LOW, 1024, 5)):
        for path in _fedslide_files(site, res):
            bag = read_feature_file(path)
            order = rng.permutation(len(bag))
            assert bag.coords is not None
            attrs = {"patch_size": 256, "patch_size_level0": size0, "level0_magnification": 20,
                     "target_magnification": mag, "overlap": 0, "name": path.stem}  # fmt: skip
            target = site / "job" / folder / f"features_{encoder}" / path.name
            _write_h5(target, bag.features[order], bag.coords[order], attrs)
    shutil.rmtree(site / "features")
    (site / SITE_LAYOUT_FILE).write_text('layout = "trident"\nroot = "job"\n')


def to_clam(site: Path) -> None:
    """Rewrite a fedslide site as two CLAM feature folders (h5_files/ int32 coords, no attributes; pt_files/)."""
    for res, folder in (("high", "clam_20x"), ("low", "clam_5x")):
        for path in _fedslide_files(site, res):
            bag = read_feature_file(path)
            assert bag.coords is not None
            _write_h5(site / "clam" / folder / "h5_files" / path.name, bag.features, bag.coords.astype(np.int32), {})
            pt = site / "clam" / folder / "pt_files" / f"{path.stem}.pt"
            pt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(bag.features), pt)
    shutil.rmtree(site / "features")
    (site / SITE_LAYOUT_FILE).write_text(
        'layout = "clam"\nroot = "clam"\nhigh = "clam_20x"\nlow = "clam_5x"\nencoder = "resnet50_trunc"\n'
    )


def _by_coords(bag: FeatureBag) -> dict[tuple[int, int], int]:
    assert bag.coords is not None
    return {(int(x), int(y)): i for i, (x, y) in enumerate(bag.coords)}


def _assert_same_pairs(want: DistillData, got: DistillData) -> None:
    """Same slides, labels, splits; same features at the same coords; the derived parent/child = the written."""
    assert [(s.slide_id, s.label, s.split) for s in got.slides] == [(s.slide_id, s.label, s.split) for s in want.slides]
    for a, b in zip(want.slides, got.slides):
        la, lb = _by_coords(a.low), _by_coords(b.low)
        assert la.keys() == lb.keys()
        for xy, i in la.items():
            assert np.allclose(a.low.features[i], b.low.features[lb[xy]])
        ha, hb = _by_coords(a.high), _by_coords(b.high)
        assert ha.keys() == hb.keys()
        assert b.high.parent is not None and b.high.child is not None and a.high.parent is not None
        assert b.low.coords is not None and a.low.coords is not None
        for xy, i in ha.items():
            j = hb[xy]
            assert np.allclose(a.high.features[i], b.high.features[j])
            parent_xy = tuple(int(v) for v in a.low.coords[a.high.parent[i]])
            assert tuple(int(v) for v in b.low.coords[b.high.parent[j]]) == parent_xy
            assert a.high.child is not None and b.high.child[j] == a.high.child[i]


@pytest.fixture()
def fedslide_site(tmp_path: Path) -> Path:
    return make_site(tmp_path / "own", "s", {"train": 4, "val": 2, "test": 2}, seed=5, tokens=False)


def test_trident_site_reads_as_its_fedslide_twin(fedslide_site: Path, tmp_path: Path) -> None:
    want = load_sites([fedslide_site])
    site = shutil.copytree(fedslide_site, tmp_path / "trident" / "s")
    to_trident(site, np.random.default_rng(0))
    got = load_sites([site])
    _assert_same_pairs(want, got)
    assert detect_encoder([site]) == "uni_v1"
    s = got.slides[0]
    assert s.high.attrs["encoder_name"] == "uni_v1" and s.high.attrs["encoder_dim"] == D
    assert s.low.attrs["child_grid"] == GRID and s.low.attrs["target_magnification"] == 5  # TRIDENT's attributes


def test_clam_site_reads_as_its_fedslide_twin(fedslide_site: Path, tmp_path: Path) -> None:
    want = load_sites([fedslide_site])
    site = shutil.copytree(fedslide_site, tmp_path / "clam" / "s")
    to_clam(site)
    got = load_sites([site])
    _assert_same_pairs(want, got)  # CLAM h5 files carry no patch size: the grid step of the coords stands in
    assert detect_encoder([site]) == "resnet50_trunc"


def test_clam_pt_files_cannot_be_paired(fedslide_site: Path, tmp_path: Path) -> None:
    site = shutil.copytree(fedslide_site, tmp_path / "clam" / "s")
    to_clam(site)
    (site / SITE_LAYOUT_FILE).write_text(
        'layout = "clam"\nroot = "clam"\nhigh = "clam_20x"\nlow = "clam_5x"\nclam-files = "pt"\n'
    )
    with pytest.raises(FeatureDataError, match=r"\.pt: no 'coords'.*clam-files = \"h5\""):
        load_sites([site])


def test_layout_declarations_are_checked(fedslide_site: Path, tmp_path: Path) -> None:
    site = shutil.copytree(fedslide_site, tmp_path / "t" / "s")
    to_trident(site, np.random.default_rng(1))
    layout = site / SITE_LAYOUT_FILE
    layout.write_text('layout = "qupath"\n')
    with pytest.raises(FeatureDataError, match=r"features.toml.*layout.*'qupath'.*fedslide.*clam.*trident"):
        load_sites([site])
    layout.write_text('layout = "trident"\nroot = "job"\nencoder = "conch"\n')
    with pytest.raises(FeatureDataError, match=r"encoder: TRIDENT features folder .*features_conch does not exist"):
        load_sites([site])
    shutil.copytree(site / "job" / TRIDENT_HIGH, site / "job" / "20x_512px_0px_overlap")
    layout.write_text('layout = "trident"\nroot = "job"\n')
    with pytest.raises(FeatureDataError, match=r"several TRIDENT folder .* at 20x \(found: 20x_256px.*20x_512px"):
        load_sites([site])
    layout.write_text(f'layout = "trident"\nroot = "job"\nhigh = "{TRIDENT_HIGH}"\n')
    assert len(load_sites([site]).slides) == 8  # naming the folder settles it
    cfg = FeatureLayoutConfig(layout="clam", root=Path("clam"))
    (site / "clam").mkdir()
    with pytest.raises(ConfigError, match=r"high: a CLAM site names the folder of its high-res CLAM run"):
        locate(site, cfg)


def test_pair_bags_derives_parents_and_drops_orphans(tmp_path: Path) -> None:
    low = FeatureBag(tmp_path / "l.h5", np.zeros((2, 3), np.float32), np.array([[0, 0], [512, 0]]), {})
    high_xy = np.array([[128, 128], [0, 0], [640, 384], [2048, 2048]])  # the last one lies in no low patch
    high = FeatureBag(tmp_path / "h.h5", np.arange(12, dtype=np.float32).reshape(4, 3), high_xy, {})
    low2, paired = pair_bags(low, high)
    assert paired.parent is not None and paired.child is not None
    assert paired.parent.tolist() == [0, 0, 1] and paired.child.tolist() == [5, 0, 3 * 4 + 1]
    assert np.array_equal(paired.features, high.features[:3]) and low2.attrs["child_grid"] == 4
    crooked = FeatureBag(
        tmp_path / "c.h5", np.zeros((1, 3), np.float32), np.array([[0, 0]]), {"patch_size_level0": 200}
    )
    with pytest.raises(FeatureFileError, match=r"c\.h5: high-res patches \(200 level-0 px\) do not tile"):
        pair_bags(low, crooked)


def test_train_reads_clam_and_trident_folders(fedslide_site: Path, tmp_path: Path) -> None:
    table = read_labels(fedslide_site / "labels.csv")
    want = load_cohort(fedslide_site / "features" / ENCODER / "high", table)
    clam = shutil.copytree(fedslide_site, tmp_path / "c" / "s")
    to_clam(clam)
    trident = shutil.copytree(fedslide_site, tmp_path / "t" / "s")
    to_trident(trident, np.random.default_rng(2))
    cases = [
        (clam / "clam" / "clam_20x", FeatureLayoutConfig(layout="clam"), True),
        (clam / "clam" / "clam_20x" / "pt_files", FeatureLayoutConfig(layout="clam", clam_files="pt"), False),
        (trident / "job", FeatureLayoutConfig(layout="trident"), True),
        (trident / "job" / TRIDENT_HIGH, FeatureLayoutConfig(layout="trident"), True),
    ]
    for folder, layout, has_coords in cases:
        got = load_cohort(folder, table, layout=layout)
        assert [s.slide_id for s in got.slides] == [s.slide_id for s in want.slides], folder
        assert [s.num_instances for s in got.slides] == [s.num_instances for s in want.slides], folder
        assert got.has_coords is has_coords
    with pytest.raises(FeatureDataError, match=r"is not a CLAM feature folder \(no h5_files/\)"):
        load_cohort(trident / "job", table, layout=FeatureLayoutConfig(layout="clam"))
    location = locate_folder(trident / "job", FeatureLayoutConfig(layout="trident"))
    assert location.folders["high"].name == "features_uni_v1" and location.encoder == "uni_v1"
    bag = read_bag(location.path("high", want.slides[0].slide_id), location)
    assert bag.attrs["patch_size_level0"] == 256 and bag.attrs["encoder_name"] == "uni_v1"


def _train_cli(argv: list[str]) -> int:
    from fedslide.common.training.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.handler(args))


@pytest.mark.slow
def test_fedslide_train_on_a_trident_job(fedslide_site: Path, tmp_path: Path) -> None:
    site = shutil.copytree(fedslide_site, tmp_path / "t" / "s")
    to_trident(site, np.random.default_rng(3))
    out = tmp_path / "run"
    argv = ["train", "--features", str(site / "job"), "--features-layout", "trident", "--labels"]
    argv += [str(site / "labels.csv"), "--out", str(out), "--model", "abmil", "--epochs", "2", "--device", "cpu"]
    argv += ["--no-progress", "--set", "model.hidden-dim=16", "--set", "features-layout.encoder=uni_v1"]
    assert _train_cli(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics  # trained and evaluated
    bad = ["train", "--features", str(site / "job"), "--features-layout", "clam", "--labels", str(site / "labels.csv")]
    assert _train_cli([*bad, "--out", str(tmp_path / "r2"), "--device", "cpu", "--no-progress"]) == 2


@pytest.mark.slow
def test_fedslide_distill_on_clam_and_trident_sites(fedslide_site: Path, tmp_path: Path) -> None:
    from fedslide.common.distillation.cli import add_parser

    clam = shutil.copytree(fedslide_site, tmp_path / "c" / "s")
    to_clam(clam)
    (clam / SITE_LAYOUT_FILE).write_text('layout = "clam"\nroot = "clam"\nhigh = "clam_20x"\nlow = "clam_5x"\n')
    trident = make_site(tmp_path / "t", "t", {"train": 4, "val": 2, "test": 2}, seed=6, tokens=False)
    to_trident(trident, np.random.default_rng(4), encoder="clam")  # one encoder label for both sites
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    argv = ["distill", "--sites", str(clam), str(trident), "--out", str(out), "--no-progress"]
    small = ["adapter.hidden-dim=16", "adapter.epochs=2", "teacher.hidden-dim=16", "student.hidden-dim=16",
             "training.epochs=2", "training.batch-size=2", "clusters.num-clusters=2", "kd.lambda-expert=0",
             "device=cpu"]  # fmt: skip
    for item in small:
        argv += ["--set", item]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kd"]["student_input"] == "pooled"  # no tokens in CLAM/TRIDENT files
    assert (out / "student").is_dir()


@pytest.mark.slow
def test_preprocess_writes_clam_layout_that_reads_back(tmp_path: Path) -> None:
    from fedslide.client.preprocess_cli import add_parser
    from fedslide.client.synth.slide import write_slide

    site = tmp_path / "site"
    (site / "slides").mkdir(parents=True)
    write_slide(site / "slides" / "g20.tif", 1100, 1000, 0.5, "generic", seed=2, tumor=True, tumor_fraction=0.4)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["preprocess", "--site", str(site), "--no-progress", "--clam-layout", "--workers", "0"])
    assert args.handler(args) == 0
    enc = "efficientnet_lite0"
    clam = site / "clam" / enc
    for res in ("high", "low"):
        own = read_feature_file(site / "features" / enc / res / "g20.h5")
        h5 = read_feature_file(clam / res / "h5_files" / "g20.h5")
        pt = read_feature_file(clam / res / "pt_files" / "g20.pt")
        assert np.array_equal(h5.features, own.features) and np.array_equal(pt.features, own.features)
        assert h5.coords is not None and own.coords is not None and np.array_equal(h5.coords, own.coords)
        assert h5.attrs["encoder_name"] == enc and h5.parent is None  # CLAM's datasets only
    (clam / "low" / "pt_files" / "g20.pt").unlink()
    assert args.handler(args) == 0  # a finished slide is skipped, its missing CLAM copy written again
    assert (clam / "low" / "pt_files" / "g20.pt").is_file()

    # read back as a CLAM site: the parent/child derived from the coords are the ones preprocessing wrote
    location = locate(site, FeatureLayoutConfig(layout="clam", root=Path(f"clam/{enc}"), high="high", low="low"))
    low, high = pair_bags(
        read_bag(location.path("low", "g20"), location), read_bag(location.path("high", "g20"), location)
    )
    own = read_feature_file(site / "features" / enc / "high" / "g20.h5")
    assert low.tokens is None and high.parent is not None and high.child is not None  # tokens stay in fedslide's
    assert np.array_equal(high.parent, own.parent) and np.array_equal(high.child, own.child)
