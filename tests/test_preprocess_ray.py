"""Preprocessing over Ray: slide claims, the claimed-slide path, and a local cluster started by the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedslide.client.preprocess import SitePreprocessor
from fedslide.client.preprocess_ray import (
    CLAIMED,
    import_ray,
    task_options,
    process_claimed,
)
from fedslide.client.slide_claims import ClaimLost, ClaimStore, claim_store
from fedslide.client.slides import SlideError
from fedslide.client.synth.slide import write_slide
from fedslide.common.config.base import ConfigError
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.features import feature_path, is_complete, read_feature_file
from fedslide.deploy.cli import main
from tests.ray_cluster import LOOPBACK_ENV, local_ray_head

ENC = "efficientnet_lite0"


def _cfg(**kw: object) -> PreprocessConfig:
    """Small patches, one thread, no DataLoader workers: a few seconds per tiny slide on a shared CPU."""
    base: dict = {
        "progress": False,
        "qc_images": False,
        "encoder": {"num_workers": 0, "batch_size": 16, "threads": 1},
        "tiling": {"high_patch_size": 128, "low_patch_size": 128},
    }
    base.update(kw)
    return PreprocessConfig.model_validate(base)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny slides (0.5 mm) and a larger one (1.2 mm) at 20×."""
    d = tmp_path_factory.mktemp("ray_slides")
    for i, seed in enumerate([0, 1, 3]):  # seeds whose 0.5-mm slide has tissue
        write_slide(d / f"s{i}.tif", 500, 500, 0.5, "generic", seed=seed, tumor=bool(i % 2))
    write_slide(d / "big.tif", 1200, 1200, 0.5, "generic", seed=7, tumor=True)
    return d


def _site(root: Path, slides: Path, names: list[str]) -> Path:
    (root / "slides").mkdir(parents=True)
    for name in names:
        shutil.copy(slides / name, root / "slides")
    return root


# --- claims (no Ray) ---------------------------------------------------------------------------------------------


def test_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    store = ClaimStore(tmp_path, lease_s=60)
    first = store.try_claim("a", "worker-1")
    assert first is not None
    assert store.try_claim("a", "worker-2") is None  # live claim of another owner
    holder = store.holder("a")
    assert holder is not None and holder.owner == "worker-1" and holder.pid == os.getpid()
    assert store.try_claim("b", "worker-2") is not None  # other slides are free
    with first:
        first.verify()
    assert store.holder("a") is None  # released on exit
    assert store.try_claim("a", "worker-2") is not None


def test_stale_claim_is_taken_over_and_the_loser_cannot_commit(tmp_path: Path) -> None:
    store = ClaimStore(tmp_path, lease_s=5)
    dead = store.try_claim("a", "worker-1")
    assert dead is not None  # its heartbeat never runs: a dead worker
    old = time.time() - 60
    os.utime(store.path("a"), (old, old))
    taker = store.try_claim("a", "worker-2")
    assert taker is not None and store.holder("a").owner == "worker-2"  # type: ignore[union-attr]
    with pytest.raises(ClaimLost):
        dead.verify()
    dead.release()  # not its claim any more: leaves the taker's file alone
    assert store.holder("a").owner == "worker-2"  # type: ignore[union-attr]


def test_same_owner_takes_back_its_live_claim(tmp_path: Path) -> None:
    """A Ray task rerun after its worker died keeps its task id: it takes its own claim back at once."""
    store = ClaimStore(tmp_path, lease_s=600)
    assert store.try_claim("a", "ray-task:42") is not None
    again = store.try_claim("a", "ray-task:42")
    assert again is not None
    again.verify()


def test_heartbeat_keeps_a_claim_alive(tmp_path: Path) -> None:
    store = ClaimStore(tmp_path, lease_s=0.8)
    claim = store.try_claim("a", "worker-1")
    assert claim is not None
    with claim:
        time.sleep(2.0)  # 2.5 leases: without heartbeats the claim would be stale
        assert store.try_claim("a", "worker-2") is None
        claim.verify()


def test_claim_files_are_whole_json(tmp_path: Path) -> None:
    store = ClaimStore(tmp_path, lease_s=60)
    assert store.try_claim("a", "w") is not None
    data = json.loads(store.path("a").read_text())
    assert set(data) == {"owner", "host", "pid", "token", "acquired"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.claim"]  # no temp files left


# --- the claimed-slide path (no Ray) ------------------------------------------------------------------------------


def test_process_claimed_honours_live_and_stale_claims(tmp_path: Path, slides: Path) -> None:
    site = _site(tmp_path / "site", slides, ["s0.tif"])
    pre = SitePreprocessor(_cfg(claim_lease_s=30, resolutions="low"))
    store = claim_store(site, ENC, 30)
    other = store.try_claim("s0", "other-driver")
    assert other is not None
    target = feature_path(site, ENC, "low", "s0")
    with other:  # live: nothing is written
        result = process_claimed(pre, site / "slides" / "s0.tif", site, "me")
        assert result.status == CLAIMED and "other-driver" in result.reason
        assert not target.exists()
    other = store.try_claim("s0", "other-driver")
    assert other is not None
    old = time.time() - 120  # the other owner died: its claim went stale
    os.utime(store.path("s0"), (old, old))
    temp = target.parent / f".{target.name}.dead0001.tmp"  # its half-written file
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"half")
    result = process_claimed(pre, site / "slides" / "s0.tif", site, "me")
    assert result.status == "done" and is_complete(target)
    assert not temp.exists() and store.holder("s0") is None


def test_local_run_refuses_a_site_cluster_workers_are_writing(tmp_path: Path, slides: Path) -> None:
    site = _site(tmp_path / "site", slides, ["s0.tif"])
    pre = SitePreprocessor(_cfg(claim_lease_s=30, resolutions="low"))
    store = claim_store(site, ENC, 30)
    claim = store.try_claim("s0", "ray-task-7")
    assert claim is not None
    temp = feature_path(site, ENC, "low", "s0").parent / ".s0.h5.w1.tmp"  # the worker's file in progress
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"half")
    with pytest.raises(SlideError, match=r"being written by cluster workers.*s0 \(ray-task-7"):
        pre.run(site)
    assert temp.exists()  # the worker's file is left alone
    old = time.time() - 120  # the worker died: its claim went stale, and the local run goes ahead
    os.utime(store.path("s0"), (old, old))
    summary = pre.run(site)
    assert [r.status for r in summary.slides] == ["done"] and not temp.exists()


def test_cli_runs_the_other_sites_when_one_is_busy(
    tmp_path: Path, slides: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = _site(tmp_path / "busy", slides, ["s0.tif"])
    free = _site(tmp_path / "free", slides, ["s1.tif"])
    claim = claim_store(busy, ENC, 300).try_claim("s0", "ray-task-1")
    assert claim is not None
    small = ["--set", "tiling.high-patch-size=128", "--set", "tiling.low-patch-size=128", "--set", "resolutions=low"]
    code = main(["preprocess", "--site", str(busy), "--site", str(free), "--no-progress", *small])
    assert code == 2  # one site could not start ...
    assert is_complete(feature_path(free, ENC, "low", "s1"))  # ... and the other still ran
    assert "being written by cluster workers" in capsys.readouterr().err


def test_lost_claim_discards_the_slide(tmp_path: Path, slides: Path) -> None:
    site = _site(tmp_path / "site", slides, ["s0.tif"])
    pre = SitePreprocessor(_cfg(resolutions="low"))

    def lose() -> None:
        raise ClaimLost("taken over")

    result = pre.process_slide(site / "slides" / "s0.tif", site, before_commit=lose)
    assert result.status == "failed" and "taken over" in result.reason
    out = site / "features" / ENC / "low"
    assert not any(out.iterdir())  # neither the file nor its temp


def test_missing_ray_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"fedslide\[cluster\]"):
        import_ray()
    (tmp_path / "slides").mkdir()
    code = main(["preprocess", "--site", str(tmp_path), "--executor", "ray", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pip install 'fedslide[cluster]'" in err and "executor = 'local'" in err


def test_ray_address_flag_selects_the_ray_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[PreprocessConfig] = []

    def fake(site: Path, cfg: PreprocessConfig) -> None:
        seen.append(cfg)
        raise ConfigError("stop here")

    monkeypatch.setattr("fedslide.client.preprocess_ray.preprocess_site_ray", fake)
    (tmp_path / "slides").mkdir()
    assert main(["preprocess", "--site", str(tmp_path), "--ray-address", "10.0.0.5:6379"]) == 2
    assert seen[0].executor == "ray" and seen[0].ray_address == "10.0.0.5:6379"


@pytest.mark.parametrize(
    ("device", "cluster_gpus", "gpus"), [("cuda", 0, 0.5), ("auto", 4, 0.5), ("auto", 0, 0.0), ("cpu", 4, 0.0)]
)
def test_slide_tasks_request_gpus_when_encoding_on_cuda(device: str, cluster_gpus: int, gpus: float) -> None:
    fake_ray = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0, "GPU": float(cluster_gpus)})
    cfg = _cfg(ray_gpus_per_task=0.5, ray_max_retries=5, encoder={"device": device, "threads": 2})
    opts = task_options(fake_ray, cfg)  # type: ignore[arg-type]
    assert opts["num_gpus"] == gpus and opts["num_cpus"] == 2 and opts["max_retries"] == 5


# --- a local Ray cluster on loopback, started by the test --------------------------------------------------------


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    with local_ray_head(num_cpus=2) as address:
        yield address


SMALL = ["--set", "encoder.threads=1", "--set", "encoder.num-workers=0", "--set", "qc-images=false"]
SMALL += ["--set", "tiling.high-patch-size=128", "--set", "tiling.low-patch-size=128", "--no-progress"]


def _preprocess_on_cluster(site: Path, address: str | None, *extra: str) -> dict:
    """`fedslide preprocess` over the cluster (None: the local path) in a fresh process, as a user runs it (and
    Ray reads its loopback setting at import)."""
    where = ["--ray-address", address] if address else ["--executor", "local"]
    cmd = [sys.executable, "-m", "fedslide.deploy.cli", "preprocess", "--site", str(site), *where]
    env = {**os.environ, **LOOPBACK_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *SMALL, *extra], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((site / "features" / ENC / "summary.json").read_text())


def _assert_same_features(a: Path, b: Path, slide_ids: list[str]) -> None:
    for sid in slide_ids:
        for res in ("low", "high"):
            fa, fb = (
                read_feature_file(feature_path(a, ENC, res, sid)),
                read_feature_file(feature_path(b, ENC, res, sid)),
            )
            np.testing.assert_array_equal(fa.coords, fb.coords)
            np.testing.assert_array_equal(fa.features, fb.features)


@pytest.mark.slow
def test_ray_matches_local_and_resumes(ray_address: str, tmp_path: Path, slides: Path) -> None:
    names = ["s0.tif", "s1.tif", "s2.tif"]
    local = _site(tmp_path / "local", slides, names)
    remote = _site(tmp_path / "remote", slides, names)
    assert _preprocess_on_cluster(local, None)["done"] == 3
    summary = _preprocess_on_cluster(remote, ray_address)
    _assert_same_features(local, remote, ["s0", "s1", "s2"])
    assert summary["done"] == 3 and [s["slide_id"] for s in summary["slides"]] == ["s0", "s1", "s2"]
    assert not any((remote / "features" / ENC / ".claims").iterdir())  # every claim released
    again = _preprocess_on_cluster(remote, ray_address)
    assert again["skipped"] == 3  # resume: finished slides are skipped


@pytest.mark.slow
def test_slide_of_a_live_other_owner_is_not_written_twice(ray_address: str, tmp_path: Path, slides: Path) -> None:
    site = _site(tmp_path / "site", slides, ["s0.tif", "s1.tif"])
    store = claim_store(site, ENC, 4)
    other = store.try_claim("s1", "other-driver")
    assert other is not None
    target = feature_path(site, ENC, "high", "s1")
    seen: dict[str, object] = {}

    def other_owner() -> None:
        """Hold s1 until the cluster has finished s0, then write s1 locally and release it."""
        with other:
            while not is_complete(feature_path(site, ENC, "high", "s0")):
                time.sleep(0.2)
            seen["written_before_release"] = target.exists()
            result = SitePreprocessor(_cfg()).process_slide(site / "slides" / "s1.tif", site)
            seen["status"] = result.status
            seen["inode"] = target.stat().st_ino

    thread = threading.Thread(target=other_owner)
    thread.start()
    summary = _preprocess_on_cluster(site, ray_address, "--set", "claim-lease-s=4")
    thread.join()
    assert seen["written_before_release"] is False and seen["status"] == "done"
    by_id = {s["slide_id"]: s["status"] for s in summary["slides"]}
    assert by_id == {"s0": "done", "s1": "skipped"}  # the cluster waited, then found s1 finished
    assert target.stat().st_ino == seen["inode"]  # and did not write it again


@pytest.mark.slow
def test_killed_worker_slide_is_redone(ray_address: str, tmp_path: Path, slides: Path) -> None:
    site = _site(tmp_path / "site", slides, ["big.tif"])
    store = claim_store(site, ENC, 300)  # lease 300 s (default): the rerun must take its own claim back
    target = feature_path(site, ENC, "high", "big")
    killed: dict[str, object] = {}

    def kill_worker_mid_slide() -> None:
        deadline = time.monotonic() + 300
        while (holder := store.holder("big")) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if holder is not None:
            os.kill(holder.pid, signal.SIGKILL)  # the Ray worker process running the slide task
            killed["file_existed"] = target.exists()

    thread = threading.Thread(target=kill_worker_mid_slide)
    thread.start()
    summary = _preprocess_on_cluster(site, ray_address)
    thread.join()
    assert killed["file_existed"] is False  # it died before it could finish
    assert summary["slides"][0]["status"] == "done" and is_complete(target)
    assert store.holder("big") is None
    assert not list(target.parent.glob(".big.h5.*"))  # no temp file left behind
