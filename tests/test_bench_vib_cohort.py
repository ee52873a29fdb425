"""The VIB cohort bench's helpers: seed summaries, paired differences and the VIB feature folder lookup."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent / "bench" / "bench_vib_cohort.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_vib_cohort", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # loaded by path: tests/bench is no package
    return module


def _runs(root: Path, aucs: dict[str, list[float]]) -> Path:
    for seed in range(3):
        rows = [
            {"model": m, "split": "test", "auc": v[seed], "balanced_acc": 0.5, "brier": 0.25} for m, v in aucs.items()
        ]
        rows.append({"model": "teacher_high", "split": "val", "auc": 0.0})  # a val row must not be read
        (root / f"seed{seed}").mkdir(parents=True)
        (root / f"seed{seed}" / "metrics.json").write_text(json.dumps({"rows": rows}))
    return root


def test_mean_ci_is_the_t_interval(bench: ModuleType) -> None:
    s = bench.mean_ci([0.8, 0.9, 1.0])
    # sd 0.1, t(0.975, 2) = 4.303: half-width 4.303 * 0.1 / sqrt(3) = 0.2484
    assert s["mean"] == pytest.approx(0.9)
    assert s["hi"] - s["mean"] == pytest.approx(0.2484, abs=1e-4)
    one = bench.mean_ci([0.7, float("nan")])
    assert one["mean"] == pytest.approx(0.7) and one["lo"] != one["lo"]  # NaN: no interval from one value


def test_table_pairs_by_seed(bench: ModuleType, tmp_path: Path) -> None:
    frozen = _runs(tmp_path / "frozen", {"teacher_high": [1.0, 1.0, 1.0], "lrmil_student": [0.8, 0.9, 0.85]})
    vib = _runs(tmp_path / "vib", {"teacher_high": [1.0, 0.9, 1.0], "lrmil_student": [0.9, 0.9, 0.95]})
    doc = bench.build_table(vib, frozen, [0, 1, 2])
    by = {(r["arm"], r["key"]): r for r in doc["rows"]}
    student = by[("vib", "student")]
    assert student["vib_minus_frozen_auc"]["values"] == pytest.approx([0.1, 0.0, 0.1])
    assert student["auc_minus_teacher"]["values"] == pytest.approx([-0.1, 0.0, -0.05])
    assert by[("vib", "teacher")]["auc"]["mean"] == pytest.approx(2.9 / 3)
    assert by[("frozen", "student")]["vib_minus_frozen_auc"] is None
    missing = by[("vib", "baseline")]["auc"]  # no baseline_low row in these runs
    assert all(v != v for v in missing["values"])
    assert "| vib | LRMIL student" in bench.markdown({**doc, "n_test": 36, "test_class_counts": {}})


def test_vib_folder_needs_exactly_one(bench: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "features" / bench.ENCODER / "high").mkdir(parents=True)
    with pytest.raises(SystemExit, match="found \\[\\]"):
        bench.vib_folder(tmp_path)
    (tmp_path / "features" / "efficientnet_lite0-vib-abc123" / "high").mkdir(parents=True)
    assert bench.vib_folder(tmp_path) == "efficientnet_lite0-vib-abc123"
    (tmp_path / "features" / "other" / "high").mkdir(parents=True)
    with pytest.raises(SystemExit, match="expected one"):
        bench.vib_folder(tmp_path)
