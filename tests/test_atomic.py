"""Atomic writes (common/atomic.py): the target holds the old or the whole new contents, and no temp file stays."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedslide.common.atomic import atomic_path, atomic_write, write_text_atomic


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_the_new_file_appears_whole_only_when_the_block_ends(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with atomic_write(target, newline="") as handle:
        handle.write("new,1\r\n")
        handle.flush()
        assert target.read_text() == "old\n"  # readers still see the old file while it is written
    assert target.read_bytes() == b"new,1\r\n" and _names(tmp_path) == ["out.csv"]


@pytest.mark.parametrize("existed", [True, False])
def test_a_failing_writer_leaves_the_target_untouched_and_no_temp_file(tmp_path: Path, existed: bool) -> None:
    target = tmp_path / "state.json"
    if existed:
        target.write_text("{}")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(target) as handle:
            handle.write('{"half": ')
            raise RuntimeError("killed")
    assert _names(tmp_path) == (["state.json"] if existed else [])
    if existed:
        assert target.read_text() == "{}"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert _names(tmp_path) == (["state.json"] if existed else [])


def test_atomic_path_serves_writers_that_take_a_name(tmp_path: Path) -> None:
    target = tmp_path / "arrays.npz"
    with atomic_path(target, suffix=".tmp.npz") as tmp:  # np.savez would append .npz to another suffix
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp.npz") and not tmp.exists()
        np.savez(tmp, a=np.arange(3))
    assert _names(tmp_path) == ["arrays.npz"]
    np.testing.assert_array_equal(np.load(target)["a"], np.arange(3))


def test_permissions_are_those_asked_for(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "key.pem", "wb", perms=0o600) as handle:
        handle.write(b"secret")
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    write_text_atomic(tmp_path / "plain.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask  # as open() would make it


def test_only_whole_file_modes_are_accepted(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'a'"):
        with atomic_write(tmp_path / "x", "a"):
            pass
