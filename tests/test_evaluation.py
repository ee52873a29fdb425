"""`fedslide evaluate / report / compare` on three tiny feature-file sites (one round per federated phase).

One leave-one-site-out study is run once per module (3 federations in-process with the real
ServerApp/ClientApp code, 3 centralized and 3 site-local distillations) and checked: the metrics.json
schema and its counts, the paired tests, the heatmaps (rendered by each site into its own run
folder, with the ground-truth tumor outline where the site has masks), the reuse of finished folds,
the report (rendered in headless Chromium: every figure must load) and the comparison of two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from PIL import Image

from fedslide.client.synth.tiff_writer import write_pyramidal_tiff
from fedslide.common.cli_support import EXIT_OK, EXIT_USAGE
from fedslide.common.config.base import ConfigError, load_config
from fedslide.common.config.evaluate import EvaluateConfig
from fedslide.deploy.study.cli import add_parsers
from fedslide.common.evaluation.compare import compare, flatten
from fedslide.deploy.study.loso import run_study
from fedslide.common.evaluation.plots import model_curves
from fedslide.common.evaluation.predictions import PredictionTable
from fedslide.common.evaluation.report import write_report
from fedslide.common.evaluation.schema import JSON_SCHEMA, METRICS_SCHEMA
from tests.feature_sites import make_site

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
TINY = {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.0}
SPLITS = {"train": 6, "val": 2, "test": 4}
ONE_ROUND = {
    "adapter": 1,
    "teacher": 1,
    "experts": 1,
    "baseline": 1,
    "student": 1,
    "cluster_iterations": 1,
    "local_epochs": 1,
    "adapter_local_epochs": 1,
}


def tiny_study(sites: list[Path], out: Path, **extra: Any) -> EvaluateConfig:
    return EvaluateConfig(
        sites=sites,
        out_dir=out,
        bootstrap=30,
        progress=False,
        threads=1,
        federation={
            "rounds": ONE_ROUND,
            "teacher": TINY,
            "student": TINY,
            "adapter": {"hidden_dim": 16},
            "clusters": {"num_clusters": 2},
            "training": {"lr": 1e-2},
        },
        distill={
            "teacher": TINY,
            "student": TINY,
            "adapter": {"hidden_dim": 16, "epochs": 2},
            "clusters": {"num_clusters": 2},
            "training": {"epochs": 3, "lr": 1e-2},
        },
        heatmaps={"per_class": 1, "size": 240},
        **extra,
    )


def _slide_and_mask(site: Path, slide_id: str, tumor: bool) -> None:
    """A small pyramidal TIFF covering the toy slide's 3 x 3 low patches (3072 px at 0.5 µm/px) and its mask."""

    def tile(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        yy, xx = np.mgrid[y : y + h, x : x + w]
        pink = np.stack([230 - (xx % 97), 180 + (yy % 50), 215 - (xx + yy) % 40], axis=-1)
        return pink.clip(0, 255).astype(np.uint8)

    write_pyramidal_tiff(site / "slides" / f"{slide_id}.tif", 3072, 3072, 0.5, "generic", tile)
    mask = np.zeros((192, 192), np.uint8)  # 8 µm/px over 1536 µm
    if tumor:
        yy, xx = np.mgrid[:192, :192]
        mask[(yy - 70) ** 2 + (xx - 110) ** 2 < 40**2] = 255
    (site / "masks").mkdir(exist_ok=True)
    Image.fromarray(mask).save(site / "masks" / f"{slide_id}.png")
    index = site / "masks" / "masks.json"
    doc = json.loads(index.read_text()) if index.is_file() else {"mpp": 8.0, "slides": {}}
    doc["slides"][slide_id] = {"file": f"{slide_id}.png", "width": 192, "height": 192, "level0_mpp": 0.5}
    index.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("eval-sites")
    out = [make_site(root, f"site{i}", SPLITS, seed=20 + i) for i in range(1, 4)]
    _slide_and_mask(out[0], "site1_test_0", tumor=False)  # labels alternate neg/pos
    _slide_and_mask(out[0], "site1_test_1", tumor=True)
    return out


@pytest.fixture(scope="module")
def study(sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("eval-study") / "tiny"
    result = run_study(tiny_study(sites, out))
    assert result.report is not None
    return result.metrics, out


def test_learning_curves_give_each_federated_model_its_own_panel() -> None:
    curves = {
        "teacher": [
            {"round": 0, "val_loss_teacher": 1.0, "val_loss_baseline": 2.0},
            {"round": 1, "val_loss_teacher": 0.5, "val_loss_baseline": 1.5, "train_loss": 0.9},
        ],
        "experts": [{"round": 0, "val_loss_0": 1.0, "val_loss_1": 3.0}, {"round": 1, "val_loss_1": 2.0}],
        "student": [{"round": 0, "val_loss": 0.7}],
    }
    assert model_curves(curves) == {
        "teacher": [(0, 1.0), (1, 0.5)],
        "baseline": [(0, 2.0), (1, 1.5)],
        "experts": [(0, 2.0), (1, 2.0)],
        "student": [(0, 0.7)],
    }


@pytest.mark.slow
def test_metrics_json_follows_its_schema(study: tuple[dict[str, Any], Path]) -> None:
    metrics, out = study
    on_disk = json.loads((out / "metrics.json").read_text())
    jsonschema.validate(on_disk, JSON_SCHEMA)
    assert on_disk["study_id"] == metrics["study_id"] == "tiny"
    assert on_disk["schema"] == METRICS_SCHEMA and on_disk["classes"] == ["neg", "pos"]
    assert set(on_disk["models"]) == {
        f"{r}.{k}"
        for r in ("local", "federated", "centralized")
        for k in ("teacher_high", "student_low", "baseline_low")
    }
    broken = dict(on_disk, models={"federated.student": {}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, JSON_SCHEMA)


@pytest.mark.slow
def test_loso_counts_every_slide_where_it_belongs(study: tuple[dict[str, Any], Path]) -> None:
    metrics, out = study
    n_site = sum(SPLITS.values())
    fed = metrics["models"]["federated.student_low"]
    for site in ("site1", "site2", "site3"):
        held = fed["out_of_site"]["per_site"][site]
        assert held["n"] == n_site and held["n_models"] == 1  # every slide of the held-out site, one fold model
        ins = fed["in_distribution"]["per_site"][site]
        assert (
            ins["n"] == 2 * SPLITS["test"] and ins["n_slides"] == SPLITS["test"]
        )  # test split, by the 2 folds it trained in
        assert ins["bootstrap"] == "patient-cluster"  # a slide scored twice moves as one cluster
        local = metrics["models"]["local.student_low"]
        assert local["in_distribution"]["per_site"][site]["n"] == SPLITS["test"]
        assert local["out_of_site"]["per_site"][site]["n"] == 2 * n_site  # by the two other sites' models
        for m in ("auc", "acc", "balanced_acc", "f1", "brier", "ece"):
            iv = held[m]
            assert iv["estimate"] is not None and iv["lo"] <= iv["hi"] and iv["n_boot_valid"] > 15, (site, m, iv)
    assert fed["out_of_site"]["overall"]["n"] == 3 * n_site
    gap = fed["gap"]["overall"]["auc"]
    assert gap == pytest.approx(
        fed["in_distribution"]["overall"]["auc"]["estimate"] - fed["out_of_site"]["overall"]["auc"]["estimate"]
    )
    # the toy task is easy at high resolution: a teacher that learned nothing would sit near 0.5
    assert metrics["models"]["centralized.teacher_high"]["out_of_site"]["overall"]["auc"]["estimate"] >= 0.8
    transfer = metrics["transfer"]["local.student_low"]["values"]
    assert set(transfer) == {"site1", "site2", "site3"} and all(len(v) == 3 for v in transfer.values())
    table = PredictionTable.read(out / "predictions.csv")
    assert len(table.select("out_of_site", "federated.teacher_high")) == 3 * n_site
    for held in ("site1", "site2", "site3"):  # the federation's evaluation-only site trained nothing
        run = out / metrics["folds"][held]["federated"]["run_dir"]
        roles = {s["name"]: s["role"] for s in json.loads((run / "metrics.json").read_text())["sites"]}
        assert roles[held] == "eval-only" and sum(r == "train" for r in roles.values()) == 2


@pytest.mark.slow
def test_paired_tests_student_vs_teacher(study: tuple[dict[str, Any], Path]) -> None:
    metrics, _ = study
    tests = [
        t for t in metrics["paired_tests"] if t["a"] == "federated.student_low" and t["b"] == "federated.teacher_high"
    ]
    assert {(t["setting"], t["site"]) for t in tests} == {
        (s, site) for s in ("in_distribution", "out_of_site") for site in ("site1", "site2", "site3", "overall")
    }
    held = {t["site"]: t for t in tests if t["setting"] == "out_of_site"}
    assert held["site1"]["method"] == "delong" and held["site1"]["n"] == sum(SPLITS.values())
    assert held["overall"]["method"] == "delong"  # every held-out slide is scored once, patients have one slide
    pooled = next(t for t in tests if t["setting"] == "in_distribution" and t["site"] == "overall")
    assert pooled["method"] == "bootstrap" and pooled["bootstrap"] == "patient-cluster"
    for t in tests:
        assert t["diff"] == pytest.approx(t["auc_a"] - t["auc_b"]) and 0.0 <= t["p_value"] <= 1.0


@pytest.mark.slow
def test_heatmaps_are_exported_by_each_site_and_of_the_centralized_reference(
    study: tuple[dict[str, Any], Path], sites: list[Path]
) -> None:
    metrics, out = study
    entries = metrics["heatmaps"]
    assert {(e["site"], e["source"], e["label"]) for e in entries} == {
        (s, src, c) for s in ("site1", "site2", "site3") for src in ("site", "centralized") for c in ("neg", "pos")
    }
    for e in entries:
        path = Path(e["path"]) if Path(e["path"]).is_absolute() else out / e["path"]
        assert path.is_file() and path.stat().st_size > 5000
        if e["source"] == "site":  # written into the site's own run folder, never the study's
            site_dir = sites[int(e["site"][-1]) - 1]
            assert path.is_relative_to(site_dir / "runs" / f"tiny-loso-{e['site']}" / "heatmaps")
    site1 = {e["slide_id"]: e for e in entries if e["site"] == "site1" and e["source"] == "site"}
    assert set(site1) == {"site1_test_0", "site1_test_1"}  # slides with a slide file are picked first
    assert site1["site1_test_1"]["mask"] is True and site1["site1_test_0"]["mask"] is False
    assert site1["site1_test_1"]["thumbnail"] == "slide"
    assert all(e["thumbnail"] == "canvas" and e["mask"] is None for e in entries if e["site"] == "site2")
    image = np.asarray(Image.open(Path(site1["site1_test_1"]["path"])).convert("RGB")).astype(int)
    magenta = (image[..., 0] > 200) & (image[..., 1] < 80) & (image[..., 2] > 200)
    assert magenta.sum() > 50  # the ground-truth tumor outline is drawn


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedslide")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}")
        return EXIT_USAGE


@pytest.mark.slow
def test_rerun_reuses_every_finished_fold(
    study: tuple[dict[str, Any], Path], sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics, out = study
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy)
    cfg = tiny_study(sites, copy).model_dump(mode="json", by_alias=True, exclude_unset=True)
    config = tmp_path / "study.toml"
    config.write_text(_toml({"evaluate": {k: v for k, v in cfg.items() if k not in ("sites", "out-dir")}}))
    code = _cli(
        [
            "evaluate",
            "--config",
            str(config),
            "--sites",
            *map(str, sites),
            "--out",
            str(copy),
            "--no-report",
            "--no-progress",
        ]
    )
    assert code == EXIT_OK, capsys.readouterr().err
    again = json.loads((copy / "metrics.json").read_text())
    assert all(info[r]["reused"] for info in again["folds"].values() for r in ("local", "federated", "centralized"))
    for model in metrics["models"]:  # same predictions, same seed: the same numbers
        assert (
            again["models"][model]["out_of_site"]["overall"]["auc"]
            == metrics["models"][model]["out_of_site"]["overall"]["auc"]
        )
    assert "federated.student_low" in capsys.readouterr().out


def _toml(doc: dict[str, Any], prefix: str = "") -> str:
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    for key, value in scalars.items():
        if value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables.items():
        text += _toml(value, f"{prefix}.{key}" if prefix else key)
    return text


CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
IMG_CHECK = """<script>window.addEventListener("load", () => {
  const r = [...document.images].map(i => ({complete: i.complete, w: i.naturalWidth, alt: i.alt}));
  const p = document.createElement("pre"); p.id = "imgcheck"; p.textContent = JSON.stringify(r);
  document.body.appendChild(p);});</script>"""


def find_chromium() -> str | None:
    """A headless-capable Chromium: $FEDSLIDE_CHROMIUM, else one on PATH (Debian: apt-get install chromium)."""
    explicit = os.environ.get("FEDSLIDE_CHROMIUM")
    if explicit and Path(explicit).is_file():
        return explicit
    return next((found for name in CHROMIUM_CANDIDATES if (found := shutil.which(name))), None)


@pytest.mark.slow
def test_report_renders_every_figure_in_headless_chromium(study: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    _, out = study
    md, page = out / "report.md", out / "report.html"
    text = page.read_text()
    sources = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert len(sources) >= 10 and all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    for needle in (
        "Cohort",
        "Paired AUC tests",
        "ROC",
        "Communication per phase",
        "Compute cost",
        "Attention heatmaps",
        "site-local student (low-res)",
        "federated student (low-res, LRMIL + D&amp;D)",
    ):
        assert needle in text, needle
    markdown = md.read_text()
    linked = re.findall(r"\]\((report_files/[^)]+)\)", markdown)
    assert linked and all((out / link).is_file() for link in linked)
    assert "| site1 |" in markdown and "scanner magnification" in markdown
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium binary: not on PATH as chromium/chromium-browser/google-chrome and FEDSLIDE_CHROMIUM "
            "unset (Debian: apt-get install chromium)"
        )
    probe = tmp_path / "report_check.html"
    probe.write_text(text.replace("</body>", IMG_CHECK + "</body>"))
    dom = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile1'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found, f"Chromium did not run the page's check (rc {dom.returncode}): {dom.stderr[-2000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(images) == len(sources)
    broken = [i["alt"] for i in images if not (i["complete"] and i["w"] > 0)]
    assert not broken, f"images that did not render: {broken}"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "evaluation_report.png"
    shot.unlink(missing_ok=True)
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--window-size=1280,6000",
            "--virtual-time-budget=10000",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert shot.is_file() and shot.stat().st_size > 50_000
    shutil.copy(page, ARTIFACTS / "evaluation_report.html")


@pytest.mark.slow
def test_report_of_a_single_federated_run(study: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    metrics, out = study
    fed_run = out / metrics["folds"]["site2"]["federated"]["run_dir"]
    assert _cli(["report", str(fed_run), "--out", str(tmp_path / "rep")]) == EXIT_OK
    text = (tmp_path / "rep" / "report.html").read_text()
    assert "AUC per site" in text and "Communication per phase" in text and "data:image/png;base64," in text
    assert _cli(["report", str(tmp_path / "nowhere")]) == EXIT_USAGE


@pytest.mark.slow
def test_compare_two_runs(
    study: tuple[dict[str, Any], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics, out = study
    same = compare(metrics, metrics)
    assert same and all(r.diff in (0.0, None) for r in same)
    other = json.loads(json.dumps(metrics))
    section = other["models"]["federated.student_low"]["out_of_site"]["overall"]
    auc = section["auc"]["estimate"]
    section["auc"].update(estimate=auc - 0.2, lo=auc - 0.25, hi=auc - 0.15)  # worse AUC in B
    section["brier"].update(estimate=0.01, lo=0.0, hi=0.02)  # better (lower) Brier in B
    rows = {(r.model, r.setting, r.site, r.metric): r for r in compare(metrics, other, ["auc", "brier"])}
    row = rows[("federated.student_low", "out_of_site", "overall", "auc")]
    assert row.diff == pytest.approx(-0.2) and row.better == "A"
    assert rows[("federated.student_low", "out_of_site", "overall", "brier")].better == "B"
    assert ("federated.student_low", "out_of_site", "site1", "auc") not in rows  # pooled rows unless --per-site
    b_file = tmp_path / "b.json"
    b_file.write_text(json.dumps(other))
    assert (
        _cli(["compare", str(out), str(b_file), "--metric", "auc", "--per-site", "--json", str(tmp_path / "cmp.json")])
        == EXIT_OK
    )
    printed = capsys.readouterr().out
    assert f"| federated.student_low | out_of_site | overall | auc | {auc:.3f} [" in printed
    assert f"{auc - 0.2:.3f} [{auc - 0.25:.3f}, {auc - 0.15:.3f}] | -0.200 | A | yes |" in printed
    assert "| federated.student_low | out_of_site | site1 | auc |" in printed
    assert json.loads((tmp_path / "cmp.json").read_text())["schema"] == "fedslide.compare/1"
    fed = out / metrics["folds"]["site1"]["federated"]["run_dir"]
    assert ("teacher_high", "held_out", "overall", "auc") in flatten(json.loads((fed / "metrics.json").read_text()))
    assert _cli(["compare", str(out), str(fed)]) == EXIT_USAGE  # nothing in common
    assert "share no comparable metric" in capsys.readouterr().err
    assert _cli(["compare", str(out), str(tmp_path / "missing")]) == EXIT_USAGE


@pytest.mark.slow
def test_report_regenerates_from_the_run_folder(study: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    _, out = study
    _, page = write_report(out, tmp_path / "again")
    assert page.stat().st_size > 100_000 and (tmp_path / "again" / "report_files").is_dir()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["federation.eval-only-sites=site1"], "federation.eval-only-sites is set by the study"),
        (["distill.out-dir=/tmp/x"], "distill.out-dir is set by the study"),
        (["paired-tests=['federated.student:federated.teacher_high']"], "is not 'A:B'"),
        (["regimes=['local', 'local']"], "must not repeat"),
        (["heatmaps.sourc=site"], "unknown key 'evaluate.heatmaps.sourc'"),
        (["federation.rounds.teacher=0"], "invalid value for 'evaluate.federation.rounds.teacher': 0"),
    ],
)
def test_bad_settings_are_refused_with_key_and_value(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(EvaluateConfig, section="evaluate", overrides=overrides)


def test_evaluate_refuses_bad_sites_before_training(
    sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(["evaluate", "--sites", str(sites[0]), "--out", str(tmp_path / "s")]) == EXIT_USAGE
    assert "at least 2 sites" in capsys.readouterr().out
    assert (
        _cli(["evaluate", "--sites", str(sites[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == EXIT_USAGE
    )
    assert "site folder(s) not found" in capsys.readouterr().out
    code = _cli(["evaluate", "--sites", *map(str, sites[:2]), "--out", str(tmp_path / "s"), "--regimes", "federated"])
    assert code == EXIT_USAGE and "federation.min-nodes = 2" in capsys.readouterr().out
    assert not (tmp_path / "s").exists()
