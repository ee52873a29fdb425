"""The main command end to end: `fedslide demo` = synth → preprocess → distill → low-res predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from common.cli import main

SMALL_DISTILL = [
    "adapter.hidden-dim=32", "adapter.epochs=3", "adapter.batch-size=64",
    "teacher.hidden-dim=16", "teacher.attention-dim=8", "student.hidden-dim=16", "student.attention-dim=8",
    "training.epochs=3", "training.batch-size=2", "training.early-stopping-patience=0",
    "clusters.num-clusters=2", "clusters.n-init=2", "clusters.min-size=1", "device=cpu",
]


def _demo(out: Path) -> int:
    argv = ["demo", "--out", str(out), "--sites", "2", "--slides-per-site", "6", "--seed", "5",
            "--set", "synth.slide-size-um=[600.0, 700.0]", "--set", "synth.progress=false",
            "--set", "preprocess.progress=false", "--set", "predict.progress=false", "--set", "predict.zoom-k=1"]
    for item in SMALL_DISTILL:
        argv += ["--set", f"distill.{item}"]
    return main(argv)


def test_demo_runs_the_whole_chain_and_reruns_from_where_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert _demo(out) == 0
    sites = [out / "cohort" / "site1", out / "cohort" / "site2"]
    rows = {r["model"] for r in json.loads((out / "run" / "metrics.json").read_text())["rows"]}
    assert rows == {"teacher_high", "baseline_low", "lrmil_student", "lrmil_dd_student"}

    test_ids = set()
    for site in sites:
        with (site / "labels.csv").open() as fh:
            test_ids |= {r["slide_id"] for r in csv.DictReader(fh) if r["split"] == "test"}
    with (out / "predictions" / "predictions.csv").open() as fh:
        preds = list(csv.DictReader(fh))
    assert {p["slide_id"] for p in preds} == test_ids and test_ids
    for p in preds:
        probs = [float(v) for k, v in p.items() if k.startswith("prob_")]
        assert len(probs) == 2 and abs(sum(probs) - 1.0) < 1e-4
        assert p["predicted"] in {"normal", "tumor"}
        assert int(p["zoom_patches_high"]) <= int(p["patches_high_total"])
    assert len(list((out / "predictions" / "heatmaps").glob("*.png"))) == len(preds)
    assert len(json.loads((out / "predictions" / "timing.json").read_text())["slides"]) == len(preds)

    capsys.readouterr()
    assert _demo(out) == 0  # a rerun keeps the cohort and skips finished slides
    printed = capsys.readouterr().out
    assert "site1: 0 done, 6 skipped, 0 failed" in printed and "site2: 0 done, 6 skipped, 0 failed" in printed


def test_demo_refuses_an_override_without_a_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--set", "sites=2"]) == 2
    assert "must start with one of: synth., preprocess., distill., predict." in capsys.readouterr().err
    assert not (tmp_path / "cohort").exists()
