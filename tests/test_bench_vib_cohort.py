"""The VIB cohort bench's helpers: seed summaries, paired differences and the VIB feature folder lookup."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent / "bench" / "bench_vib_cohort.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The bench, loaded by path (tests/bench is no package) with the sibling benches it imports by name."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("bench_distill", "bench_lowres_ablation"):
            _load(name, mp)
        yield _load("bench_vib_cohort", mp)


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


def _load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Load a bench by path under its module name, for as long as `monkeypatch` lasts."""
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _predict_run(pdir: Path, rows: dict[str, tuple[float, float | None, int, int]]) -> None:
    """A `fedslide predict` output: slide -> (student P(tumor), zoom P(tumor) or None, 20x encoded, 20x total)."""
    pdir.mkdir(parents=True)
    lines = ["slide_id,prob_normal,prob_tumor,zoom_prob_normal,zoom_prob_tumor"]
    slides = {}
    for sid, (p, z, enc, total) in rows.items():
        zoom = f"{1 - z},{z}" if z is not None else ","
        lines.append(f"{sid},{1 - p},{p},{zoom}")
        slides[sid] = {"patches_low": 8, "zoom": {"patches_high": enc, "patches_high_total": total}}
    (pdir / "predictions.csv").write_text("\n".join(lines) + "\n")
    (pdir / "timing.json").write_text(json.dumps({"slides": slides}))


def test_zoom_table_summarises_the_predict_runs(bench: ModuleType, tmp_path: Path) -> None:
    view = tmp_path / "views" / "site1"
    view.mkdir(parents=True)
    (view / "labels.csv").write_text(
        "slide_id,label,split\na,tumor,test\nb,tumor,test\nc,normal,test\nd,normal,test\ne,tumor,train\n"
    )
    _runs(tmp_path / "runs", {"lrmil_student": [0.75, 0.5, 0.9]})
    # seed 0: the student ranks one normal above one tumour (AUC 0.75), zoom fixes it; slide d has no zoom label
    _predict_run(
        tmp_path / "predict" / "zoom_seed0",
        {"a": (0.9, 0.99, 4, 16), "b": (0.3, 0.9, 4, 16), "c": (0.4, 0.1, 4, 16), "d": (0.2, None, 0, 16)},
    )
    _predict_run(
        tmp_path / "predict" / "zoom_seed1",
        {"a": (0.9, 0.8, 2, 16), "b": (0.8, 0.7, 2, 16), "c": (0.1, 0.2, 2, 16), "d": (0.2, 0.3, 2, 16)},
    )
    doc = bench.zoom_table(tmp_path, [0, 1, 2], 2, 0.5)
    top = doc["rows"]["zoom"]
    assert top["seeds"] == [0, 1]  # seed 2 has no predict run: left out, not counted as a failure
    assert top["student_from_slides"]["auc"]["values"] == pytest.approx([0.75, 1.0])
    assert top["zoom"]["auc"]["values"] == pytest.approx([1.0, 1.0])
    assert top["fallback_to_student"] == 1
    assert top["high_cost_saved"] == pytest.approx(1 - 20 / 128)
    assert top["zoom_high_patches_mean"] == pytest.approx(20 / 8)
    assert doc["rows"]["zoomthr"]["seeds"] == []
    assert doc["student_distill_auc"]["0"] == pytest.approx(0.75)
    md = (tmp_path / "vib_zoom.md").read_text()
    assert "| VIB LRMIL student + zoom top-2 | 0, 1 | 0.875 [" in md and "relevance > 0.5" in md
