"""Site hygiene: unknown config sections refused, run directories kept under `runs/`, caches that load no code,
private file modes at the site."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedslide.client.client_app import app as client_app
from fedslide.client.site_run import RunIdError, SiteRun, private_umask, run_dir_for
from fedslide.common.config.base import KNOWN_SECTIONS, ConfigError, load_config
from fedslide.common.config.dump import SECTIONS
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.train import TrainConfig
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.server.local_grid import FIRST_NODE, LocalGrid
from tests.feature_sites import make_site


# ---- unknown config sections --------------------------------------------------------------------------------------
def test_an_unknown_section_is_refused_naming_it_and_the_known_ones(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[train]\nepochs = 3\n\n[trian]\nepochs = 5\n")
    with pytest.raises(ConfigError) as refused:
        load_config(TrainConfig, path=config, section="train")
    message = str(refused.value)
    assert "unknown section [trian]" in message and str(config) in message
    assert all(f"[{name}]" in message for name in ("train", "federation", "deploy"))


def test_every_stage_section_is_known(tmp_path: Path) -> None:
    assert {name for name, _ in SECTIONS} | {"deploy"} == set(KNOWN_SECTIONS)
    config = tmp_path / "all.toml"
    config.write_text(
        "".join(f"[{name}]\n" + ("seed = 3\n" if name == "federation" else "") for name in KNOWN_SECTIONS)
    )
    assert load_config(FederationConfig, path=config, section="federation").seed == 3


# ---- run directories ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../escape", "..", ".", "/etc", "a/b", "", ".hidden", "a\\b", "x" * 129, "é"])
def test_a_run_id_that_is_not_one_plain_name_is_refused(tmp_path: Path, run_id: str) -> None:
    with pytest.raises(RunIdError, match="refused"):
        run_dir_for(tmp_path / "runs", run_id)


def test_a_run_directory_linked_outside_runs_is_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "linked").symlink_to(tmp_path)
    with pytest.raises(RunIdError, match="outside"):
        run_dir_for(runs, "linked")
    assert run_dir_for(runs, "run-20260101.1_a") == runs / "run-20260101.1_a"


def test_the_site_refuses_an_escaping_run_id_from_the_server(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    with pytest.raises(RunIdError):
        SiteRun.from_node_config({"site-dir": str(site)}, FederationConfig(), "../../outside")
    assert SiteRun.from_node_config({"site-dir": str(site)}, FederationConfig(), "r1").run_dir == site / "runs" / "r1"


# ---- caches that load no code -------------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(_Payload.marker),))

    marker = ""


def test_site_caches_round_trip_tensors_arrays_and_plain_values(tmp_path: Path) -> None:
    run = SiteRun(tmp_path, tmp_path / "runs" / "r", FederationConfig(), "site")
    bags = {"s1": (np.arange(6, dtype=np.float32).reshape(3, 2), None), "s2": (np.ones((1, 2)), np.zeros((1, 2)))}
    run.save("cache.pt", {"fingerprint": "f", "teacher": torch.ones(2, 3), "bags": bags, "n": np.int64(4)})
    loaded = run.load("cache.pt", "f")
    assert loaded is not None
    assert torch.equal(loaded["teacher"], torch.ones(2, 3)) and loaded["n"] == 4
    assert isinstance(loaded["bags"]["s1"], tuple) and loaded["bags"]["s1"][1] is None
    np.testing.assert_array_equal(loaded["bags"]["s1"][0], bags["s1"][0])
    assert loaded["bags"]["s2"][1].dtype == np.float64
    assert run.load("cache.pt", "other") is None


def test_a_cache_file_holding_code_is_refused_not_run(tmp_path: Path) -> None:
    run = SiteRun(tmp_path, tmp_path / "runs" / "r", FederationConfig(), "site")
    run.run_dir.mkdir(parents=True)
    _Payload.marker = str(tmp_path / "ran")
    torch.save({"fingerprint": "f", "evil": _Payload()}, run.run_dir / "cache.pt")
    with pytest.raises(pickle.UnpicklingError):
        run.load("cache.pt", "f")
    assert not (tmp_path / "ran").exists()


# ---- private outputs ----------------------------------------------------------------------------------------------
def test_private_umask_makes_files_0600_and_dirs_0700_then_restores(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        with private_umask():
            (tmp_path / "d").mkdir()
            (tmp_path / "d" / "f").write_text("x")
        assert os.umask(0o022) == 0o022  # restored
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o600


def test_a_client_app_step_writes_its_run_folder_privately(tmp_path: Path) -> None:
    site = make_site(tmp_path, "site1", {"train": 2, "val": 1, "test": 1}, seed=1)
    grid = LocalGrid(client_app, [{"site-dir": str(site)}], FederationConfig(run_id="modes").to_run_config())
    content = RecordDict({p.CONFIG: ConfigRecord({ph.RUN_ID: "modes", ph.PHASE: ph.HANDSHAKE.phase})})
    message = Message(content=content, dst_node_id=FIRST_NODE, message_type=ph.HANDSHAKE.message_type)
    previous = os.umask(0o022)  # a permissive umask around the SuperNode
    try:
        (reply,) = grid.send_and_receive([message])
        assert os.umask(0o022) == 0o022  # the step left the process's umask as it was
    finally:
        os.umask(previous)
    assert not reply.has_error()
    written = [site / "runs", *(site / "runs").rglob("*")]
    assert any(path.is_file() for path in written)  # the ledger at least
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
