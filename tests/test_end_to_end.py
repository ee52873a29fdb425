"""The whole centralized chain through the `fedslide` command: synth → preprocess → distill → predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from common.cli import main

SMALL_DISTILL = [
    "adapter.hidden-dim=32", "adapter.epochs=3", "adapter.batch-size=64",
    "teacher.hidden-dim=16", "teacher.attention-dim=8", "student.hidden-dim=16", "student.attention-dim=8",
    "training.epochs=3", "training.batch-size=2", "training.early-stopping-patience=0",
    "clusters.num-clusters=2", "clusters.n-init=2", "clusters.min-size=1", "device=cpu",
]


def test_synth_preprocess_distill_predict(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    assert main(["synth", "--out", str(cohort), "--sites", "2", "--slides-per-site", "6", "--seed", "5",
                 "--set", "slide-size-um=[600.0, 700.0]", "--set", "progress=false"]) == 0
    sites = [cohort / "site1", cohort / "site2"]
    assert main(["preprocess", "--no-progress", *[a for s in sites for a in ("--site", str(s))]]) == 0

    run = tmp_path / "run"
    argv = ["distill", "--sites", *map(str, sites), "--out", str(run), "--no-progress"]
    for item in SMALL_DISTILL:
        argv += ["--set", item]
    assert main(argv) == 0
    rows = {r["model"] for r in json.loads((run / "metrics.json").read_text())["rows"]}
    assert rows == {"teacher_high", "baseline_low", "lrmil_student", "lrmil_dd_student"}

    out = tmp_path / "pred"
    assert main(["predict", "--slides", str(sites[0] / "slides"), "--model", str(run / "student"),
                 "--out", str(out), "--no-progress", "--zoom", "1"]) == 0
    with (out / "predictions.csv").open() as fh:
        preds = list(csv.DictReader(fh))
    with (sites[0] / "labels.csv").open() as fh:
        labelled = {r["slide_id"] for r in csv.DictReader(fh)}
    assert {p["slide_id"] for p in preds} == labelled
    for p in preds:
        probs = [float(v) for k, v in p.items() if k.startswith("prob_")]
        assert len(probs) == 2 and abs(sum(probs) - 1.0) < 1e-4
        assert p["predicted"] in {"normal", "tumor"}
        assert int(p["zoom_patches_high"]) <= int(p["patches_high_total"])
    assert len(list((out / "heatmaps").glob("*.png"))) == len(preds)
    timing = json.loads((out / "timing.json").read_text())
    assert len(timing["slides"]) == len(preds)
