"""The main command end to end: `fedslide demo` = synth → preprocess → a real Flower federation (SuperLink +
one SuperNode per site as separate processes, TLS and node authentication) → low-res prediction at every site.
Takes a few minutes: every message starts a ClientApp process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedslide.deploy.cli import main

TINY_FEDERATION = [
    *(
        f"rounds.{k}=1"
        for k in (
            "adapter",
            "teacher",
            "experts",
            "baseline",
            "student",
            "cluster-iterations",
            "local-epochs",
            "adapter-local-epochs",
        )
    ),
    "adapter.hidden-dim=32",
    "teacher.hidden-dim=16",
    "teacher.attention-dim=8",
    "student.hidden-dim=16",
    "student.attention-dim=8",
    "training.batch-size=2",
    "clusters.num-clusters=2",
    "clusters.n-init=2",
    "clusters.suppress-below=1",
    "device=cpu",
    "run-id=e2e",
]


def _demo(out: Path, *extra: str) -> int:
    argv = [
        "demo",
        "--out",
        str(out),
        "--sites",
        "3",
        "--slides-per-site",
        "6",
        "--seed",
        "5",
        "--set",
        "synth.slide-size-um=[600.0, 700.0]",
        "--set",
        "synth.progress=false",
        "--set",
        "preprocess.progress=false",
        "--set",
        "predict.progress=false",
        *extra,
    ]
    for item in TINY_FEDERATION:
        argv += ["--set", f"federation.{item}"]
    return main(argv)


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert _demo(out) == 0
    run = out / "runs" / "e2e"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {r["model"] for r in metrics["rows"]} == {"teacher_high", "student_low", "baseline_low"}
    assert sorted(s["name"] for s in metrics["sites"]) == ["site1", "site2", "site3"]
    assert (run / "report.md").is_file() and (run / "plots" / "site_auc.png").is_file()
    assert {p.name for p in (run / "logs").iterdir()} >= {"serverapp.log", "superlink.log", "supernode-site1.log"}
    for site in ("site1", "site2", "site3"):
        site_dir = out / "cohort" / site
        phases = {
            json.loads(line)["phase"] for line in (site_dir / "runs" / "e2e" / "egress.jsonl").read_text().splitlines()
        }
        assert {"handshake", "teacher", "student", "evaluate"} <= phases
        with (site_dir / "labels.csv").open() as fh:
            test_ids = {r["slide_id"] for r in csv.DictReader(fh) if r["split"] == "test"}
        with (run / "predictions" / site / "predictions.csv").open() as fh:
            preds = list(csv.DictReader(fh))
        assert {p["slide_id"] for p in preds} == test_ids and test_ids
        for p in preds:
            probs = [float(v) for k, v in p.items() if k.startswith("prob_")]
            assert len(probs) == 2 and abs(sum(probs) - 1.0) < 1e-4

    capsys.readouterr()
    assert _demo(out, "--resume", "e2e") == 0  # a rerun keeps the cohort and features and resumes the run
    printed = capsys.readouterr().out
    assert "site1: 0 done, 6 skipped, 0 failed" in printed and "site3: 0 done, 6 skipped, 0 failed" in printed
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert set(state["phases"]) >= {"adapter", "teacher", "clusters", "experts", "kd-cache", "student"}


def test_demo_refuses_an_override_without_a_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--set", "sites=2"]) == 2
    assert "must start with one of: synth., preprocess., federation., predict." in capsys.readouterr().err
    assert not (tmp_path / "cohort").exists()
