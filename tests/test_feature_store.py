"""Feature files held in memory for a warm SuperExec's tasks (common.feature_store, client.site_run)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from fedslide.client import site_run
from fedslide.common.distillation.data import load_sites
from fedslide.common.feature_store import FeatureStore, bag_bytes
from fedslide.common.features import feature_path, read_feature_file
from fedslide.common.training.errors import FeatureDataError
from tests.feature_sites import ENCODER, make_site, write_slide, _world


def _files(site: Path) -> list[tuple[Path, bool]]:
    ids = sorted(p.stem for p in (site / "features" / ENCODER / "low").glob("*.h5"))
    return [(feature_path(site, ENCODER, r, i), r == "low") for i in ids for r in ("low", "high")]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return make_site(tmp_path, "s1", {"train": 4, "val": 2, "test": 2}, seed=3)


def test_a_held_file_is_served_from_memory_until_it_changes(site: Path) -> None:
    store = FeatureStore(max_bytes=2**30)
    assert store.hold(_files(site)) == (16, 16, 0)
    path = feature_path(site, ENCODER, "low", "s1_train_0")
    first = store.read(path, load_tokens=True)
    assert np.shares_memory(first.features, store.read(path, load_tokens=True).features)  # no copy, no read
    assert first.path == path and first.tokens is not None and (store.hits, store.misses) == (2, 0)
    first.child = np.zeros(1, dtype=np.int64)  # a caller's change to its bag stays in its copy
    first.attrs["slide_id"] = "changed"
    again = store.read(path, load_tokens=True)
    assert again.child is None and again.attrs["slide_id"] == "s1_train_0"
    assert store.read(path, load_tokens=False).tokens is None and store.misses == 1  # held with tokens only

    old = first.features.copy()
    write_slide(site, "s1_train_0", 1, np.random.default_rng(99), _world())  # rewritten: renamed into place
    fresh = store.read(path, load_tokens=True)
    assert not np.shares_memory(fresh.features, first.features) and store.misses == 2
    np.testing.assert_array_equal(fresh.features, read_feature_file(path).features)
    assert fresh.features.shape != old.shape or not np.array_equal(fresh.features, old)
    assert store.hold(_files(site)) == (16, 2, 0)  # the re-check reads the changed files and keeps the others
    assert np.shares_memory(store.read(path, load_tokens=True).features, store.read(path, True).features)


def test_hold_keeps_within_its_memory_and_drops_files_no_longer_listed(site: Path) -> None:
    files = _files(site)
    sizes = [bag_bytes(read_feature_file(p, load_tokens=t)) for p, t in files]
    store = FeatureStore(max_bytes=sum(sizes[:5]))
    held, read, left = store.hold(files)
    assert held == read == 5 and left == len(files) - 5 and store.nbytes <= store.max_bytes
    assert store.hold(files[:2]) == (2, 0, 0) and len(store) == 2  # the others are let go
    files[3][0].unlink()
    assert store.hold(files[:4]) == (3, 1, 1)  # a missing file is left to the task that reads it


def test_load_sites_gives_the_same_data_from_memory_and_reports_the_same_errors(site: Path) -> None:
    store = FeatureStore(max_bytes=2**30)
    store.hold(_files(site))
    disk, memory = load_sites([site]), load_sites([site], store=store)
    assert store.misses == 0 and store.hits == 16
    assert [s.key for s in disk.slides] == [s.key for s in memory.slides]
    assert [s.split for s in disk.slides] == [s.split for s in memory.slides]
    for a, b in zip(disk.slides, memory.slides):
        np.testing.assert_array_equal(a.high.features, b.high.features)
        np.testing.assert_array_equal(a.high.child, b.high.child)
        np.testing.assert_array_equal(a.low.tokens, b.low.tokens)
    bad = feature_path(site, ENCODER, "high", "s1_val_1")
    bad.write_bytes(b"not an h5 file")
    store.hold(_files(site))  # the broken file is not held; reading it names it, as from disk
    with pytest.raises(FeatureDataError) as from_disk:
        load_sites([site])
    with pytest.raises(FeatureDataError) as from_memory:
        load_sites([site], store=store)
    assert str(bad) in str(from_memory.value) and str(from_disk.value) == str(from_memory.value)


def _child_load(site: Path, queue: multiprocessing.Queue) -> None:
    store = site_run.held_features()
    data = load_sites([site], store=store)
    queue.put((store.hits if store else -1, store.misses if store else -1, len(data.slides)))


def test_a_forked_task_reads_the_site_from_what_its_parent_holds(site: Path) -> None:
    # the warm SuperExec's way: hold in this process, then fork; the child's load_sites reads no feature file
    assert site_run.held_features() is None  # nothing held outside a SuperExec
    try:
        store, read, left = site_run.hold_site_features(site, 2**30)
        assert len(store) == read == 16 and left == 0 and site_run.held_features() is store
        queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
        child = multiprocessing.get_context("fork").Process(target=_child_load, args=(site, queue))
        child.start()
        child.join(60)
        assert child.exitcode == 0 and queue.get(timeout=5) == (16, 0, 8)
    finally:
        site_run.release_site_features()
