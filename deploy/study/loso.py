"""The leave-one-site-out (LOSO) study behind `fedslide evaluate`.

For every site h of the cohort:
- federated: a federation of all sites in which h takes part evaluation-only (it receives the final
  global models and returns metrics only); the training sites score their test split
  (in-distribution), h scores its slides (out-of-site). Run in-process with the real ServerApp and
  ClientApp code (`server.local_grid.LocalGrid`), run id `<study-id>-loso-<h>`.
- centralized: the pooled reference without h (`fedslide distill` on the other sites), scored on h
  (out-of-site) and on the other sites' test splits (in-distribution): the upper bound.
- local: the site-local model trained on h alone, scored on h's test split (in-distribution) and on
  every other site's slides (out-of-site).

Study setting. In a federation per-slide predictions and heatmaps never leave a site: every site
writes `<site>/runs/<run_id>/predictions.csv` (and its heatmaps) for itself. This command is for a
study or benchmark where all the sites' folders are on one machine: it reads those files
directly, pools them into `<out-dir>/predictions.csv` and computes the metrics with bootstrap CIs
(`common.evaluation.summary`). Outputs under `<out-dir>`: metrics.json (schema
`fedslide.evaluation.metrics/1`, see `common.evaluation.schema`), predictions.csv, federation/
(one run folder per fold), centralized/loso-<h>/, local/<h>/, heatmaps/, report.md + report.html.
A rerun reuses every finished fold run whose settings are unchanged (`reuse = true`) and resumes
an interrupted federation from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fedslide.client.client_app import app as client_app
from fedslide.common import __version__
from fedslide.common.config.base import ConfigError
from fedslide.common.config.evaluate import EvaluateConfig
from fedslide.common.config.federation import FederationConfig
from fedslide.common.distillation.bundle import BundleMismatchError, StudentBundle
from fedslide.common.distillation.data import DistillData, SlidePair, load_sites
from fedslide.common.distillation.pipeline import run_distill
from fedslide.common.evaluation.predictions import (
    STUDY_PREDICTIONS,
    PredictionTable,
    ScoreCost,
    missing_predictions_cause,
    read_site_predictions,
    rows_from_scores,
    score_bundles,
)
from fedslide.common.evaluation.report import write_report
from fedslide.common.evaluation.schema import METRICS_SCHEMA, settings_doc
from fedslide.common.evaluation.summary import summarize
from fedslide.common.training.outputs import write_json
from fedslide.common.training.splits import SPLITS_FILE
from fedslide.deploy.study.clinical_missingness import clinical_missingness
from fedslide.deploy.study.e2e_cost import end_to_end_cost
from fedslide.deploy.study.heatmaps import pick_examples, render_slide_heatmap, slide_file
from fedslide.server.local_grid import LocalGrid
from fedslide.server.server_app import run
from tqdm import tqdm

log = logging.getLogger(__name__)

FOLD_FILE = "fold.json"
METRICS_FILE = "metrics.json"


class StudyError(RuntimeError):
    """A fold of the study failed; the message names the fold, the run folder and the cause."""


@dataclass
class Study:
    """The cohort of a study and where its outputs go."""

    cfg: EvaluateConfig
    out_dir: Path
    study_id: str
    site_dirs: dict[str, Path]
    data: DistillData
    table: PredictionTable
    cost: dict[str, ScoreCost] = field(default_factory=dict)
    folds: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.site_dirs)

    def slides(self, site: str, splits: set[str] | None = None) -> list[SlidePair]:
        """The site's slides (of `splits` when given), in labels.csv order."""
        return [s for s in self.data.slides if s.site == site and (splits is None or s.split in splits)]

    def held_out(self, site: str) -> list[SlidePair]:
        """The slides an out-of-site model is scored on."""
        return self.slides(site, None if self.cfg.held_out_split == "all" else {"test"})

    def test(self, site: str) -> list[SlidePair]:
        return self.slides(site, {"test"})


def slug(name: str) -> str:
    """A run-id-safe version of a site name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fold_state(run_dir: Path, config_hash: str, reuse: bool) -> str:
    """ "done" (reuse it), "resume" (same settings, unfinished) or "fresh" (absent, or cleared: other settings)."""
    record = run_dir / FOLD_FILE
    if record.is_file() and reuse:
        try:
            state = json.loads(record.read_text())
        except json.JSONDecodeError:
            state = {}
        if state.get("config_hash") == config_hash:
            return "done" if state.get("finished") else "resume"
    if run_dir.exists():
        log.info("%s: other settings or reuse = false: starting this fold afresh", run_dir)
        shutil.rmtree(run_dir)
    return "fresh"


def _mark(run_dir: Path, config_hash: str, finished: bool, **extra: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / FOLD_FILE, {"config_hash": config_hash, "finished": finished, **extra})


# ---- the cohort ------------------------------------------------------------------------------------
def prepare(cfg: EvaluateConfig) -> Study:
    """Check the sites and load every slide's feature files (one DistillData over all sites)."""
    if cfg.out_dir is None:
        raise ConfigError("evaluate needs a study folder (--out DIR or out-dir = ...)")
    if len(cfg.sites) < 2:
        raise ConfigError(f"evaluate needs at least 2 sites for leave-one-site-out, got {len(cfg.sites)}")
    dirs = [Path(s) for s in cfg.sites]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise ConfigError(f"site folder(s) not found: {', '.join(missing)}")
    names = [d.name for d in dirs]
    repeated = sorted(n for n, c in Counter(names).items() if c > 1)
    if repeated:
        raise ConfigError(f"site folders must have distinct names (the site names), got {repeated} more than once")
    fed_min = cfg.federation.min_nodes
    if "federated" in cfg.regimes and len(dirs) - 1 < fed_min:
        raise ConfigError(
            f"{len(dirs)} sites leave {len(dirs) - 1} training site(s) per LOSO federation, fewer than "
            f"federation.min-nodes = {fed_min}; add sites or lower federation.min-nodes"
        )
    out_dir = Path(cfg.out_dir).resolve()
    study_id = cfg.study_id or slug(out_dir.name)
    encoder = cfg.encoder or cfg.distill.encoder or cfg.federation.encoder
    data = load_sites(dirs, encoder, seed=cfg.distill.seed, carving=cfg.carve)  # carves splits a site lacks
    check_cohort(cfg, data, dict(zip(names, dirs)))
    return Study(cfg, out_dir, study_id, dict(zip(names, dirs)), data, PredictionTable(data.classes))


def check_cohort(cfg: EvaluateConfig, data: DistillData, site_dirs: dict[str, Path]) -> None:
    """Refuse, before anything is trained, what no fold could score: a site without labelled slides (every site is
    held out once), and with held-out-split = "test" a site without test slides; warn where a site has no test
    slides (carve.test-fraction = 0, or none in its split column) or its test split lacks a class."""
    problems = []
    for name, site_dir in site_dirs.items():
        slides = [s for s in data.slides if s.site == name]
        labels = site_dir / "labels.csv"
        if not slides:
            problems.append(
                f"site {name}: {labels} has no labelled slide with both feature files; as the held-out "
                "site it would have nothing to score: add labelled slides or leave the site out"
            )
            continue
        test = [s for s in slides if s.split == "test"]
        if cfg.held_out_split == "test" and not test:
            problems.append(
                f"site {name}: no test slides ({labels} / {site_dir / SPLITS_FILE}), and held-out-split = "
                '"test" scores only those when the site is held out: set held-out-split = "all", '
                "or give the site a test split"
            )
        elif not test:
            log.warning(
                "site %s has no test slides (%s): it is scored out-of-site only, never in-distribution", name, labels
            )
        elif len({s.label for s in test}) < len({s.label for s in slides}):
            absent = sorted({data.classes[s.label] for s in slides} - {data.classes[s.label] for s in test})
            log.warning(
                "site %s: its test split (%s) has no slide of class(es) %s: its in-distribution AUC is undefined",
                name,
                labels,
                ", ".join(absent),
            )
    if problems:
        raise ConfigError("refusing to start the study:\n  " + "\n  ".join(problems))


def _scanner(site_dir: Path) -> str | None:
    record = site_dir / "cohort.json"
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text()).get("scanner_style")
    except (OSError, json.JSONDecodeError):
        return None


def _mask_count(site_dir: Path) -> int:
    index = site_dir / "masks" / "masks.json"
    if not index.is_file():
        return 0
    try:
        return len(json.loads(index.read_text()).get("slides") or {})
    except (OSError, json.JSONDecodeError):
        return 0


def cohort(study: Study) -> list[dict[str, Any]]:
    """The cohort table: slides, patients, splits, class balance, scanner magnification and mpp per site."""
    rows = []
    classes = study.data.classes
    for name, site_dir in study.site_dirs.items():
        slides = study.slides(name)
        mags = sorted(
            {
                float(s.low.attrs["level0_magnification"])
                for s in slides
                if s.low.attrs.get("level0_magnification") not in (None, "")
            }
        )
        mpps = sorted({round(float(s.low.attrs["slide_mpp"]), 4) for s in slides if s.low.attrs.get("slide_mpp")})
        rows.append(
            {
                "name": name,
                "dir": str(site_dir.resolve()),
                "slides": len(slides),
                "patients": len({s.patient_id for s in slides}),
                "splits": {sp: sum(s.split == sp for s in slides) for sp in ("train", "val", "test")},
                "classes": {c: sum(s.label == i for s in slides) for i, c in enumerate(classes)},
                "magnification": mags,
                "mpp": mpps,
                "scanner": _scanner(site_dir),
                "masks": _mask_count(site_dir),
                "held_out_slides": len(study.held_out(name)),
            }
        )
    return rows


# ---- the three regimes -----------------------------------------------------------------------------
def _distill(study: Study, sites: list[str], run_dir: Path, what: str) -> bool:
    """Run (or reuse) `fedslide distill` on `sites` into `run_dir`; True when it was reused."""

    cfg = study.cfg
    dcfg = cfg.distill.model_copy(
        update={
            "sites": [study.site_dirs[s] for s in sites],
            "out_dir": run_dir,
            "encoder": cfg.distill.encoder or cfg.encoder or study.data.encoder,
            "threads": cfg.distill.threads or cfg.threads,
            "carve": cfg.carve,
        }
    )
    config_hash = _hash({**dcfg.to_toml_dict(), "out-dir": None, "progress": None, "threads": None})
    state = _fold_state(run_dir, config_hash, cfg.reuse)
    if state == "done" and (run_dir / "student" / "bundle.json").is_file():
        return True
    _mark(run_dir, config_hash, False)
    try:
        run_distill(dcfg, progress=False)
    except Exception as exc:
        raise StudyError(f"{what} (sites {', '.join(sites)}) failed in {run_dir}: {type(exc).__name__}: {exc}") from exc
    _mark(run_dir, config_hash, True, sites=sites)
    return False


def _score(study: Study, run_dir: Path, slides: list[SlidePair], setting: str, regime: str, fold: str) -> None:
    if not slides:
        return
    scores, cost = score_bundles(
        run_dir, slides, study.data.classes, study.cfg.progress, f"score {fold} @ {slides[0].site}"
    )
    study.table.rows.extend(rows_from_scores(scores, slides, setting, regime, fold))
    study.cost.setdefault(regime, ScoreCost()).add(cost)


def run_local(study: Study) -> None:
    """Each site alone: trained on its own slides, scored everywhere."""
    for name in tqdm(study.names, desc="site-local models", unit="site", disable=not study.cfg.progress):
        run_dir = study.out_dir / "local" / slug(name)
        reused = _distill(study, [name], run_dir, f"site-local model of {name}")
        fold = f"local:{name}"
        _score(study, run_dir, study.test(name), "in_distribution", "local", fold)
        for other in study.names:
            if other != name:
                _score(study, run_dir, study.held_out(other), "out_of_site", "local", fold)
        study.folds.setdefault(name, {})["local"] = {
            "run_dir": str(run_dir.relative_to(study.out_dir)),
            "reused": reused,
        }


def run_centralized(study: Study) -> None:
    """Pooled reference without each site in turn."""
    for held in tqdm(study.names, desc="centralized LOSO", unit="fold", disable=not study.cfg.progress):
        run_dir = study.out_dir / "centralized" / f"loso-{slug(held)}"
        train = [s for s in study.names if s != held]
        reused = _distill(study, train, run_dir, f"centralized model without {held}")
        _score(study, run_dir, study.held_out(held), "out_of_site", "centralized", held)
        for site in train:
            _score(study, run_dir, study.test(site), "in_distribution", "centralized", held)
        study.folds.setdefault(held, {})["centralized"] = {
            "run_dir": str(run_dir.relative_to(study.out_dir)),
            "reused": reused,
        }


def fold_run_id(study: Study, held: str) -> str:
    """Run id of the federation that holds `held` out."""
    return f"{study.study_id}-loso-{slug(held)}"


def _federate(study: Study, held: str) -> tuple[Path, bool]:
    """Run (or reuse / resume) the federation without `held`; its server run folder and whether it was reused."""

    cfg = study.cfg
    runs_dir = study.out_dir / "federation"
    run_id = fold_run_id(study, held)
    run_dir = runs_dir / run_id
    fcfg = cfg.federation.model_copy(
        update={
            "run_id": run_id,
            "runs_dir": runs_dir,
            "eval_only_sites": [held],
            "encoder": cfg.federation.encoder or cfg.encoder or study.data.encoder,
            "threads": cfg.federation.threads or cfg.threads,
            "carve": cfg.carve,
        }
    )
    dirs = [str(d.resolve()) for d in study.site_dirs.values()]
    config_hash = _hash({**fcfg.to_toml_dict(), "runs-dir": None, "threads": None, "sites": dirs})
    state = _fold_state(run_dir, config_hash, cfg.reuse)
    if state == "done" and (run_dir / METRICS_FILE).is_file():
        return run_dir, True
    resume = state == "resume" and (run_dir / "checkpoint" / "state.json").is_file()
    _mark(run_dir, config_hash, False)
    run_config = fcfg.model_copy(update={"resume": resume}).to_run_config()
    grid = LocalGrid(client_app, [{"site-dir": d} for d in dirs], run_config)
    try:
        run(grid, FederationConfig.from_run_config(run_config))
    except Exception as exc:
        raise StudyError(
            f"federation without {held} failed in {run_dir}: {type(exc).__name__}: {exc} "
            "(rerun the same command to resume it from its checkpoint)"
        ) from exc
    _mark(run_dir, config_hash, True, held_out=held)
    return run_dir, False


def run_federated(study: Study) -> None:
    """One federation per held-out site; the sites' own predictions files are read afterwards."""
    by_site = {name: {s.slide_id: s for s in study.slides(name)} for name in study.names}
    for held in tqdm(study.names, desc="federated LOSO", unit="fold", disable=not study.cfg.progress):
        run_dir, reused = _federate(study, held)
        fed = json.loads((run_dir / METRICS_FILE).read_text())
        fed_classes = [str(c) for c in fed.get("classes") or study.data.classes]
        run_id = run_dir.name
        for name, site_dir in study.site_dirs.items():
            path = site_dir / "runs" / run_id / "predictions.csv"
            if name != held and not study.test(name):
                continue  # a site without a test split (carve.test-fraction = 0) scores nothing in-distribution
            if not path.is_file():
                raise StudyError(
                    f"federation without {held} ({run_dir}): {path} is missing: {missing_predictions_cause(fed, name)}"
                )
            if name == held:
                splits = None if study.cfg.held_out_split == "all" else ["test"]
                rows = read_site_predictions(
                    path, by_site[name], fed_classes, study.data.classes, "out_of_site", held, splits
                )
            else:
                rows = read_site_predictions(
                    path, by_site[name], fed_classes, study.data.classes, "in_distribution", held, ["test"]
                )
            study.table.rows.extend(rows)
        study.folds.setdefault(held, {})["federated"] = {
            "run_dir": str(run_dir.relative_to(study.out_dir)),
            "run_id": run_id,
            "reused": reused,
            "site_run_dirs": {n: str((d / "runs" / run_id).resolve()) for n, d in study.site_dirs.items()},
        }
        # the held-out site's BD AUC at 0/50/80/100 % of its clinical rows removed (a fold with a BD model only)
        column = clinical_missingness(
            study.site_dirs[held] / "runs" / run_id / "student_bundle",
            study.site_dirs[held],
            study.held_out(held),
            classes=study.data.classes,
        )
        if column is not None:
            study.folds[held]["federated"]["clinical_missingness"] = column


# ---- heatmaps --------------------------------------------------------------------------------------
def export_heatmaps(study: Study) -> list[dict[str, Any]]:
    """Example heatmaps per site: by the site itself (federated student of its fold, into its own run folder)
    and/or of the centralized reference of that fold (into <out-dir>/heatmaps/)."""

    hm = study.cfg.heatmaps
    if not hm.enabled or hm.per_class == 0:
        return []
    classes = study.data.classes
    entries: list[dict[str, Any]] = []
    jobs = []
    for name, site_dir in study.site_dirs.items():
        examples = pick_examples(study.held_out(name), classes, hm.per_class, site_dir)
        if hm.source in ("site", "both") and "federated" in study.cfg.regimes:
            run_dir = site_dir / "runs" / fold_run_id(study, name)
            jobs.append(
                (
                    name,
                    site_dir,
                    examples,
                    run_dir / "student_bundle",
                    run_dir / "heatmaps",
                    "site",
                    "federated.student_low",
                    f"exported by {name} (federated student, LOSO fold without {name})",
                    "federated student (site export)",
                )
            )
        if hm.source in ("centralized", "both") and "centralized" in study.cfg.regimes:
            bundle = study.out_dir / "centralized" / f"loso-{slug(name)}" / "student"
            jobs.append(
                (
                    name,
                    site_dir,
                    examples,
                    bundle,
                    study.out_dir / "heatmaps" / "centralized" / slug(name),
                    "centralized",
                    "centralized.student_low",
                    f"centralized reference without {name}",
                    "centralized reference",
                )
            )
    for name, site_dir, examples, bundle_dir, out, source, model, caption, short in tqdm(
        jobs, desc="heatmaps", unit="site", disable=not study.cfg.progress
    ):
        loaded = StudentBundle.load(bundle_dir)
        for slide in examples:
            path = out / f"{slide.slide_id}.png"
            try:
                info = render_slide_heatmap(
                    loaded, slide, site_dir, path, source=short, true_label=classes[slide.label], long_side=hm.size
                )
            except BundleMismatchError as exc:  # the site has no 5x files of the bundle's encoder (any more)
                log.warning("heatmap of %s (%s) skipped: %s", slide.slide_id, caption, exc)
                continue
            shown = str(path.relative_to(study.out_dir)) if path.is_relative_to(study.out_dir) else str(path.resolve())
            entries.append(
                {
                    "site": name,
                    "slide_id": slide.slide_id,
                    "label": classes[slide.label],
                    "split": slide.split,
                    "source": source,
                    "model": model,
                    "fold": name,
                    "caption": caption,
                    "path": shown,
                    **info,
                }
            )
    return entries


def measure_end_to_end(study: Study) -> dict[str, Any]:
    """End-to-end seconds per slide from the file at high and low resolution (`deploy.study.e2e_cost`): up to
    `cost-slides` held-out test slides with slide files (sites in name order), with the centralized bundle of the
    fold that held their site out (the federated one when the study has no centralized regime); {} when off."""
    n = study.cfg.cost_slides
    if n == 0 or not ({"centralized", "federated"} & set(study.cfg.regimes)):
        return {}
    for name in sorted(study.site_dirs):
        site_dir = study.site_dirs[name]
        files = [f for f in (slide_file(site_dir, s.slide_id) for s in study.test(name)) if f is not None][:n]
        if not files:
            continue
        if "centralized" in study.cfg.regimes:
            bundle = study.out_dir / "centralized" / f"loso-{slug(name)}" / "student"
        else:
            bundle = site_dir / "runs" / fold_run_id(study, name) / "student_bundle"
        return {"site": name, **end_to_end_cost(bundle, files, study.cfg.threads)}
    return end_to_end_cost(Path(), [], study.cfg.threads)


# ---- the whole study -------------------------------------------------------------------------------
def _federation_summary(study: Study) -> dict[str, Any]:
    """What the report needs from each fold's federation: communication, learning curves, cost, timings."""
    out: dict[str, Any] = {}
    for held, info in study.folds.items():
        if "federated" not in info:
            continue
        fed = json.loads((study.out_dir / info["federated"]["run_dir"] / METRICS_FILE).read_text())
        out[held] = {
            "run_dir": info["federated"]["run_dir"],
            "sites": [{k: s.get(k) for k in ("name", "role")} for s in fed.get("sites", [])],
            "communication": fed.get("communication", {}),
            "learning_curves": fed.get("learning_curves", {}),
            "cost": fed.get("cost", {}),
            "timings": fed.get("timings", {}),
            "privacy": {k: fed.get("privacy", {}).get(k) for k in ("enabled", "epsilon", "delta")},
            "refused": fed.get("refused", []),
            "missing": fed.get("missing", []),
            "rejections": len(fed.get("rejections", [])),
        }
    return out


def _cost(study: Study, federation: dict[str, Any]) -> dict[str, Any]:
    """High vs low patches and seconds per slide: measured here on the bundles, and as the federations report it."""
    source = "centralized" if "centralized" in study.cost else ("local" if "local" in study.cost else None)
    out: dict[str, Any] = {
        "note": "MIL-model seconds on feature files (patch encoding excluded); patches = "
        "high-res patches read by the teacher vs low-res patches read by the student"
    }
    if source is not None:
        out["measured"] = {"models": source, **study.cost[source].to_dict()}
    fed_costs = [f["cost"] for f in federation.values() if f.get("cost")]
    if fed_costs:

        def mean(res: str, key: str) -> float | None:
            values = [c[res][key] for c in fed_costs if c.get(res, {}).get(key) is not None]
            return sum(values) / len(values) if values else None

        fed = {res: {k: mean(res, k) for k in ("patches_per_slide", "seconds_per_slide")} for res in ("high", "low")}
        fed["high_over_low"] = {
            k: _ratio(fed["high"][k], fed["low"][k]) for k in ("patches_per_slide", "seconds_per_slide")
        }
        out["federated"] = {"folds": len(fed_costs), **fed}
    return out


@dataclass
class StudyResult:
    """Where the study wrote its outputs, and its metrics document."""

    out_dir: Path
    metrics: dict[str, Any]
    report: tuple[Path, Path] | None = None


def run_study(cfg: EvaluateConfig) -> StudyResult:
    """Run every fold of every regime (reusing finished ones), then score, summarise and report."""
    start = clock = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    study = prepare(cfg)
    study.out_dir.mkdir(parents=True, exist_ok=True)

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        study.timings[name] = round(now - clock, 3)
        clock = now

    lap("load")
    for regime, step in (("local", run_local), ("centralized", run_centralized), ("federated", run_federated)):
        if regime in cfg.regimes:
            step(study)
            lap(regime)
    heatmaps = export_heatmaps(study)
    lap("heatmaps")
    end_to_end = measure_end_to_end(study)
    lap("end_to_end_cost")
    study.table.write(study.out_dir / STUDY_PREDICTIONS)
    summary = summarize(
        study.table,
        study.names,
        cfg.paired_tests,
        n_boot=cfg.bootstrap,
        alpha=cfg.alpha,
        seed=cfg.seed,
        ece_bins=cfg.ece_bins,
        paired_method=cfg.paired_test,
        progress=cfg.progress,
    )
    lap("metrics")
    federation = _federation_summary(study)
    study.timings["total"] = round(time.perf_counter() - start, 3)
    metrics: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "study_id": study.study_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fedslide_version": __version__,
        "classes": list(study.data.classes),
        "encoder": study.data.encoder,
        "regimes": list(cfg.regimes),
        "sites": cohort(study),
        "settings": settings_doc(cfg.held_out_split),
        "bootstrap": {
            "n_boot": cfg.bootstrap,
            "alpha": cfg.alpha,
            "seed": cfg.seed,
            "paired_test": cfg.paired_test,
            "ece_bins": cfg.ece_bins,
        },
        **summary,
        "folds": study.folds,
        "federation": federation,
        "cost": {**_cost(study, federation), **({"end_to_end": end_to_end} if end_to_end else {})},
        "heatmaps": heatmaps,
        "predictions": STUDY_PREDICTIONS,
        "config": cfg.to_toml_dict(),
        "timings": study.timings,
    }
    write_json(study.out_dir / METRICS_FILE, metrics)
    result = StudyResult(study.out_dir, metrics)
    if cfg.report:
        result.report = write_report(study.out_dir)
    return result


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or zero."""
    return num / den if num and den else None
