"""The LOSO bench's helpers: issue 31's target check and the per-variant linked site views."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent / "bench" / "bench_loso.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_loso", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # loaded by path: tests/bench is no package
    return module


def _row(pooled: float | None, at_site4: float | None) -> dict[str, object]:
    return {"out_of_site_pooled": pooled, "per_site": {"site4": {"in_site": 1.0, "out_of_site": at_site4}}}


def test_targets_margins_and_verdicts(bench: ModuleType) -> None:
    rows = {"federated.teacher_high": _row(0.99, 0.90), "federated.student_low": _row(0.97, 0.84)}
    pooled, shifted = bench.targets(rows, "site4")
    assert pooled["threshold"] == pytest.approx(0.96) and pooled["met"]
    assert shifted["threshold"] == pytest.approx(0.85) and not shifted["met"]
    assert "site4" in shifted["target"]


def test_targets_skip_missing_figures(bench: ModuleType) -> None:
    assert bench.targets({"federated.teacher_high": _row(0.9, 0.9)}, "site4") == []
    rows = {"federated.teacher_high": _row(0.9, None), "federated.student_low": _row(0.5, 0.5)}
    [only] = bench.targets(rows, "site4")
    assert not only["met"] and only["student"] == 0.5
    assert len(bench.targets(rows, None)) == 1


def _site(root: Path) -> Path:
    site = root / "site1"
    (site / "slides").mkdir(parents=True)
    (site / "slides" / "a.svs").write_bytes(b"x")
    (site / "labels.csv").write_text("slide_id,label\na,1\n")
    (site / "features" / "enc" / "low").mkdir(parents=True)
    return site


def test_view_links_everything_but_features(bench: ModuleType, tmp_path: Path) -> None:
    site = _site(tmp_path / "cohort")
    [view] = bench.view_sites([site], tmp_path / "views", link_features=False)
    assert (view / "slides").is_symlink() and (view / "slides" / "a.svs").read_bytes() == b"x"
    assert (view / "labels.csv").is_symlink()
    assert (view / "features").is_dir() and not (view / "features").is_symlink()
    assert list((view / "features").iterdir()) == []  # preprocessed afresh: nothing written lands in the cohort
    (view / "features" / "enc-finetuned").mkdir()
    assert not (site / "features" / "enc-finetuned").exists()


def test_view_links_feature_folders_and_is_idempotent(bench: ModuleType, tmp_path: Path) -> None:
    site = _site(tmp_path / "cohort")
    for _ in range(2):  # a rerun reuses the views
        [view] = bench.view_sites([site], tmp_path / "views", link_features=True)
    assert (view / "features" / "enc").is_symlink()
    assert (view / "features" / "enc").resolve() == (site / "features" / "enc").resolve()
    (view / "features" / "enc-finetuned").mkdir()  # pixel stage 1's re-encoded files stay in the view
    assert not (site / "features" / "enc-finetuned").exists()


def test_each_out_folder_is_its_own_study(bench: ModuleType, tmp_path: Path) -> None:
    # seeds that share one --views-dir must not share the sites' run folders (<study-id>-loso-<site>)
    assert bench.study_id(tmp_path / "mac s1") == "mac_s1"
    assert bench.study_id(tmp_path / "b_s1") != bench.study_id(tmp_path / "b_s2")
