"""Low-res student ablation on one cohort (issue 31): teacher, baseline, frozen adapter, pixel stage 1, its add-ons.

    python tests/bench/bench_lowres_ablation.py --cohort H48 --out OUT [--seeds 0 1 2] [--step all]
        [--test-fraction 0.25] [--ft-max-patches 384] [--ft-epochs 1] [--threads 1] [--timing-slides 12]
        [--zoom-k 2] [--zoom-threshold 0.5]

Run on demand (not collected by pytest); every step is resumable (finished runs are reused), so a step can be run
alone (`--step views|finetune|distill|predict|table`). Centralized, on the cohort's sites (`H48/site*`):

1. views: OUT/views/<variant>/<site>/ holds links to the site's slides and frozen-encoder features and a labels.csv
   whose split column is carved once here (`common.training.splits.carve_splits`, stratified, seed 0,
   `--test-fraction` of each site as test, 20 % of the rest as val), so the pooled test split has >= 36 slides.
   Variants: frozen (no fine-tuned features), ft (pixel stage 1, stain jitter off), ft_stain (jitter on).
2. finetune: one `fedslide finetune` per fine-tuned variant on a pooled site of the TRAIN and VAL slides of
   every site (test slides' pixels are never seen), `--max-patches` patches, `--epochs` passes; the weights are
   then copied to every view site and `fedslide finetune` there re-encodes its 5x files (training is skipped:
   same settings hash). The fine-tune is done once and reused by every MIL seed.
3. distill: `fedslide distill` per (config, seed) on the view sites (CONFIGS below); test metrics come from
   its metrics.json (feature files).
4. predict: `fedslide predict` end to end from the slide files on every test slide of every seed: the full pixel
   student and the frozen-adapter student, each with `--zoom K` and with `--zoom-threshold T` (zoom rows; the
   low pass also gives the student from the slides), and on a timing subset of
   `--timing-slides` test slides (seed 0 bundles) the teacher at high res and the frozen-adapter student.
5. table: OUT/lowres_ablation.json and .md: per row the mean and 95 % t-interval over seeds of AUC, balanced
   accuracy and Brier, per-seed values, 5x (and 20x) patches per slide, seconds per slide (median over the
   timing subset), and the targets (student AUC >= teacher AUC - 0.02 on the seed mean; >= 10x speed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from bench_distill import AUC_MARGIN, SPEED_TARGET, fedslide, finite, fmt, read_predictions, run_logged

from fedslide.client.slides import discover_slides
from fedslide.common.config.preprocess import SlideConfig
from fedslide.common.distillation.feature_folders import finetuned_features_name
from fedslide.common.metrics import classification_metrics
from fedslide.common.training.labels import read_labels
from fedslide.common.training.splits import carve_splits

ENCODER = "efficientnet_lite0"
FINETUNED = "{finetuned}"  # stands for the variant's features/<encoder>-ft-<hash12> folder (`finetuned_folder`)
# fine-tuned variant -> `fedslide finetune --set` beyond the shared flags
VARIANTS: dict[str, list[str] | None] = {
    "frozen": None,
    "ft": ["stain.enabled=false"],
    "ft_stain": ["stain.enabled=true"],
}
# The pixel students read the fine-tuned encoder's whole-patch features (student-input raw: no adapter, as
# LRMIL's student reads its fine-tuned patch embeddings) and start from the teacher (those features are trained
# into the teacher's input space; 'auto' would start raw students from scratch).
PIXEL = [f"low-features={FINETUNED}", "kd.student-input=raw", "kd.student-init=teacher"]
LRMIL_STAGE2 = ["kd.lambda-attention=1", "kd.lambda-instance=1"]
# distill config -> (view variant, distill --set)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "frozen": ("frozen", []),
    "px": ("ft", PIXEL),
    "px_att": ("ft", PIXEL + LRMIL_STAGE2),
    "px_att_stain": ("ft_stain", PIXEL + LRMIL_STAGE2),
    # diagnostic: the fine-tuned 4x4 token cells (the grid stage 1 aligns to the children) through the adapter
    "pxtok_att": ("ft", [f"low-features={FINETUNED}", "kd.student-input=tokens", *LRMIL_STAGE2]),
}
# row key -> (label, distill config, model in its metrics.json, headline row of the table)
ROWS: dict[str, tuple[str, str, str, bool]] = {
    "teacher": ("teacher (20×)", "frozen", "teacher_high", True),
    "baseline": ("labels-only low-res baseline (frozen 5× features)", "frozen", "baseline_low", True),
    "adapter": ("frozen adapter (today's default LRMIL student)", "frozen", "lrmil_student", True),
    "pixel": ("pixel stage 1 (fine-tuned 5× encoder, no adapter) + logit KD", "px", "lrmil_student", True),
    "pixel_att": ("+ attention KD + instance loss (λ 1 each)", "px_att", "lrmil_student", True),
    "pixel_att_dd": ("+ D&D", "px_att", "lrmil_dd_student", True),
    "pixel_att_dd_stain": ("+ stain augmentation in stage 1 (HED jitter on)", "px_att_stain", "lrmil_dd_student", True),
    "adapter_dd": ("(extra) frozen adapter + D&D", "frozen", "lrmil_dd_student", False),
    "baseline_ft": ("(extra) labels-only baseline on fine-tuned 5× features", "px", "baseline_low", False),
    "pixel_dd": ("(extra) pixel stage 1 + D&D, no attention KD", "px", "lrmil_dd_student", False),
    "pixtok_att": (
        "(extra) fine-tuned tokens + adapter + attention KD + instance loss",
        "pxtok_att",
        "lrmil_student",
        False,
    ),
    "pixtok_att_dd": (
        "(extra) fine-tuned tokens + adapter + attention KD + instance loss + D&D",
        "pxtok_att",
        "lrmil_dd_student",
        False,
    ),
}
FULL = "pixel_att_dd_stain"  # the whole pipeline: the student the targets are about
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ---------------------------------------------------------------- 1. views


def cohort_sites(cohort: Path) -> list[Path]:
    sites = sorted(p for p in cohort.glob("site*") if (p / "labels.csv").is_file())
    if not sites:
        raise SystemExit(f"{cohort}: no site*/labels.csv")
    return sites


def carve(site: Path, test_fraction: float) -> list[dict[str, str]]:
    """labels.csv rows of the site with a split column carved here (stratified, seed 0)."""
    table = read_labels(site / "labels.csv")
    rows = table.rows
    split = carve_splits(
        [r.slide_id for r in rows],
        [r.label for r in rows],
        [r.patient_id for r in rows],
        list(table.classes),
        test_fraction,
        0.2,
        0,
        str(site / "labels.csv"),
    )
    return [{"slide_id": r.slide_id, "label": r.label, "split": split[r.slide_id]} for r in rows]


def make_views(sites: list[Path], out: Path, test_fraction: float) -> None:
    """OUT/views/<variant>/<site>/: links to slides and frozen features, labels.csv with the carved split."""
    for site in sites:
        rows = carve(site, test_fraction)
        for variant in VARIANTS:
            view = out / "views" / variant / site.name
            (view / "features").mkdir(parents=True, exist_ok=True)
            for link, target in ((view / "slides", site / "slides"), (view / "features" / ENCODER, None)):
                target = target or site / "features" / ENCODER  # preprocess may still be writing it
                if not link.is_symlink():
                    link.symlink_to(target.absolute(), target_is_directory=True)
            with (view / "labels.csv").open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["slide_id", "label", "split"])
                w.writeheader()
                w.writerows(rows)
        counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
        print(f"{site.name}: {counts}", flush=True)


def view_sites(out: Path, variant: str) -> list[Path]:
    return sorted((out / "views" / variant).glob("site*"))


def split_of(view: Path) -> dict[str, str]:
    with (view / "labels.csv").open(newline="") as fh:
        return {r["slide_id"]: r["split"] for r in csv.DictReader(fh)}


def labels_of(view: Path) -> dict[str, str]:
    with (view / "labels.csv").open(newline="") as fh:
        return {r["slide_id"]: r["label"] for r in csv.DictReader(fh)}


# ---------------------------------------------------------------- 2. stage 1 on pixels


def pooled_train_site(out: Path, per_site: int | None) -> Path:
    """OUT/finetune/pool: every site's train and val slides (the first `per_site` by id, or all), linked (made once).

    A slide without both feature files is left out (and so is its place in the `per_site` count)."""
    pool = out / "finetune" / "pool"
    if pool.exists():
        return pool
    tmp = pool.with_name("pool.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    exts = SlideConfig().extensions
    for sub in ("slides", f"features/{ENCODER}/low", f"features/{ENCODER}/high"):
        (tmp / sub).mkdir(parents=True)
    for view in view_sites(out, "frozen"):
        files = {p.stem: p for p in discover_slides(view / "slides", exts)}
        taken = 0
        for sid, split in sorted(split_of(view).items()):
            feats = [view / "features" / ENCODER / res / f"{sid}.h5" for res in ("low", "high")]
            if split == "test" or (per_site is not None and taken >= per_site) or not all(f.is_file() for f in feats):
                continue
            taken += 1
            (tmp / "slides" / files[sid].name).symlink_to(files[sid].resolve())
            for f, res in zip(feats, ("low", "high")):
                (tmp / "features" / ENCODER / res / f.name).symlink_to(f.resolve())
    tmp.rename(pool)
    return pool


def finetune(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune each variant once on the pooled train+val slides, then re-encode every view site's 5x files."""
    info: dict[str, Any] = {}
    for variant in args.variants:
        extra = VARIANTS[variant] or []
        flags = [
            "--max-patches",
            str(args.ft_max_patches),
            "--epochs",
            str(args.ft_epochs),
            "--no-progress",
            "--set",
            f"encoder.threads={args.threads}",
            *[x for kv in extra for x in ("--set", kv)],
        ]
        weights_dir = out / "finetune" / variant / "weights"
        manifest = weights_dir / f"{ENCODER}.json"
        if not manifest.is_file():
            pool = pooled_train_site(out, args.pool_slides_per_site)
            cmd = fedslide("finetune", str(pool), "--no-reencode", *flags, "--set", f"output={weights_dir}")
            rc, _ = run_logged(cmd, out / "logs" / f"finetune_{variant}.log", args.threads)
            if rc != 0:
                raise SystemExit(f"finetune {variant} failed (exit {rc}); see {out / 'logs'}")
        reencode_s = 0.0
        for view in view_sites(out, variant):
            dest = view / "finetune"
            dest.mkdir(exist_ok=True)
            for name in (f"{ENCODER}.pt", f"{ENCODER}.json"):
                if not (dest / name).is_file():
                    shutil.copy2(weights_dir / name, dest / name)
            rc, seconds = run_logged(
                fedslide("finetune", str(view), *flags), out / "logs" / f"reencode_{variant}_{view.name}.log", 1
            )
            if rc != 0:
                raise SystemExit(f"re-encoding {view} failed (exit {rc}); see {out / 'logs'}")
            reencode_s += seconds
        doc = json.loads(manifest.read_text())
        info[variant] = {
            "set": extra,
            "weights_hash": doc["weights_hash"],
            "patches": doc["patches"],
            "slides": doc["slides"],
            "pool_slides": len(list((out / "finetune" / "pool" / "slides").iterdir())),
            "epochs": args.ft_epochs,
            "trainable_params": doc["trainable_params"],
            "seconds": doc["seconds"],
            "patches_per_s_incl_targets": doc["patches"] * args.ft_epochs / doc["seconds"],
            "history": doc["history"],
            "reencode_wall_s_last_call": reencode_s,
        }
    for variant, doc in info.items():
        (out / "finetune" / variant / "finetune.json").write_text(json.dumps(doc, indent=2) + "\n")
    return info


# ---------------------------------------------------------------- 3. distill


def run_dir(out: Path, config: str, seed: int) -> Path:
    return out / "runs" / config / f"seed{seed}"


def finetuned_folder(out: Path, variant: str) -> str:
    """The features/<name> folder that re-encoding with the variant's fine-tuned weights wrote at each view."""
    doc = json.loads((out / "finetune" / variant / "weights" / f"{ENCODER}.json").read_text())
    return finetuned_features_name(ENCODER, doc["weights_hash"])


def distill_cmd(sites: list[Path], dest: Path, seed: int, threads: int, sets: list[str]) -> list[str]:
    """`fedslide distill` of `sites` into `dest` with the run's seed, threads and `--set KEY=VALUE` overrides."""
    overrides = [x for kv in [f"threads={threads}", *sets] for x in ("--set", kv)]
    return fedslide(
        "distill", "--sites", *map(str, sites), "--out", str(dest), "--seed", str(seed), "--no-progress", *overrides
    )


def distill(out: Path, args: argparse.Namespace) -> None:
    for seed in args.seeds:
        for config in args.configs:
            variant, sets = CONFIGS[config]
            if any(FINETUNED in kv for kv in sets):
                sets = [kv.replace(FINETUNED, finetuned_folder(out, variant)) for kv in sets]
            dest = run_dir(out, config, seed)
            if (dest / "metrics.json").is_file():
                continue
            cmd = distill_cmd(view_sites(out, variant), dest, seed, args.threads, sets + args.distill_set)
            rc, _ = run_logged(cmd, out / "logs" / f"distill_{config}_seed{seed}.log", args.threads)
            if rc != 0:
                raise SystemExit(f"distill {config} seed {seed} failed (exit {rc}); see {out / 'logs'}")


# ---------------------------------------------------------------- 4. predict from the slide files


def link_slides(out: Path, name: str, ids: list[str], views: list[Path] | None = None) -> Path:
    """OUT/<name>/: links to the given slides of `views` (default: the frozen views)."""
    dest = out / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    exts = SlideConfig().extensions
    for view in view_sites(out, "frozen") if views is None else views:
        for p in discover_slides(view / "slides", exts):
            if p.stem in ids:
                (dest / p.name).symlink_to(p.resolve())
    return dest


def test_ids(out: Path) -> list[str]:
    return sorted(sid for v in view_sites(out, "frozen") for sid, s in split_of(v).items() if s == "test")


def timing_ids(out: Path, n: int) -> list[str]:
    """Every k-th test slide (sorted by id, so spread over the sites), n of them."""
    ids = test_ids(out)
    step = max(1, len(ids) // max(n, 1))
    return ids[::step][:n]


def zoom_runs(args: argparse.Namespace) -> dict[str, tuple[str, str, str, list[str]]]:
    """Zoom rows: key -> (row label, distill config, bundle folder, predict options)."""
    top = ["--zoom", str(args.zoom_k)]
    thr = ["--zoom-threshold", str(args.zoom_threshold)]
    return {
        "zoom": ("full pixel student + zoom top-{k}", "px_att_stain", "student", top),
        "zoomthr": ("full pixel student + zoom relevance > {t}", "px_att_stain", "student", thr),
        "zoomadp": ("frozen adapter + zoom top-{k}", "frozen", "lrmil_student", top),
        "zoomadpthr": ("frozen adapter + zoom relevance > {t}", "frozen", "lrmil_student", thr),
    }


def predict(out: Path, args: argparse.Namespace) -> None:
    all_dir = link_slides(out, "test_slides", test_ids(out))
    timing_dir = link_slides(out, "timing_slides", timing_ids(out, args.timing_slides))
    jobs: list[tuple[str, Path, Path, list[str]]] = []
    for key, (_, config, folder, options) in zoom_runs(args).items():
        for seed in args.seeds:
            jobs.append((f"{key}_seed{seed}", run_dir(out, config, seed) / folder, all_dir, options))
    seed0 = args.seeds[0]
    jobs += [
        ("timing_teacher_high", run_dir(out, "frozen", seed0) / "student", timing_dir, ["--resolution", "high"]),
        ("timing_adapter", run_dir(out, "frozen", seed0) / "lrmil_student", timing_dir, []),
        ("timing_pixel_full", run_dir(out, "px_att_stain", seed0) / "student", timing_dir, []),
    ]
    for key, bundle, slides, extra in jobs:
        run_predict(out, key, bundle, slides, extra, args.threads)


def run_predict(out: Path, key: str, bundle: Path, slides: Path, extra: list[str], threads: int) -> None:
    """`fedslide predict` of `bundle` on the slide folder into OUT/predict/<key>, log in OUT/logs (a finished run,
    one with a timing.json, is reused; a missing bundle is skipped with a note; a failed run exits)."""
    dest = out / "predict" / key
    if (dest / "timing.json").is_file():
        return
    if not (bundle / "bundle.json").is_file():
        print(f"skipping predict {key}: no bundle {bundle} (its distill run is missing)", flush=True)
        return
    cmd = fedslide(
        "predict",
        "--slides",
        str(slides),
        "--model",
        str(bundle),
        "--out",
        str(dest),
        "--no-heatmaps",
        "--no-progress",
        "--device",
        "cpu",
        "--set",
        f"threads={threads}",
        *extra,
    )
    rc, _ = run_logged(cmd, out / "logs" / f"predict_{key}.log", threads)
    if rc not in (0, 3):
        raise SystemExit(f"predict {key} failed (exit {rc}); see {out / 'logs'}")


# ---------------------------------------------------------------- 5. table


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean and 95 % t-interval over seeds."""
    v = [x for x in values if finite(x)]
    if not v:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "values": values}
    m = statistics.fmean(v)
    if len(v) < 2:
        return {"mean": m, "lo": math.nan, "hi": math.nan, "values": values}
    half = T_975.get(len(v) - 1, 1.96) * statistics.stdev(v) / math.sqrt(len(v))
    return {"mean": m, "lo": m - half, "hi": m + half, "values": values}


def fmt_ci(s: dict[str, Any]) -> str:
    if not finite(s["mean"]):
        return "n/a"
    ci = f" [{s['lo']:.3f}, {s['hi']:.3f}]" if finite(s["lo"]) else ""
    return f"{s['mean']:.3f}{ci}"


def patches_per_slide(out: Path, folder: str, res: str, ids: list[str]) -> float:
    counts = []
    for view in view_sites(out, "frozen"):
        for sid in ids:
            p = view / "features" / folder / res / f"{sid}.h5"
            if p.is_file():
                with h5py.File(p, "r") as f:
                    counts.append(int(f["features"].shape[0]))
    return statistics.fmean(counts) if counts else math.nan


def timing_median(out: Path, key: str, ids: list[str], field: str = "total_s") -> float:
    path = out / "predict" / key / "timing.json"
    if not path.is_file():
        return math.nan
    slides = json.loads(path.read_text())["slides"]
    vals = [slides[s][field] for s in ids if s in slides]
    return statistics.median(vals) if vals else math.nan


def zoom_rows(
    out: Path, args: argparse.Namespace, labels: dict[str, str], classes: list[str], key: str = "zoom"
) -> dict[str, Any]:
    """Per seed: the student end to end from the slides, and the same + its zoom pass (run `key`)."""
    student: dict[str, list[float]] = {"auc": [], "balanced_acc": [], "brier": []}
    zoom: dict[str, list[float]] = {"auc": [], "balanced_acc": [], "brier": []}
    high_patches, low_patches, high_total, fallback = [], [], [], 0
    for seed in args.seeds:
        pdir = out / "predict" / f"{key}_seed{seed}"
        if not (pdir / "predictions.csv").is_file():
            continue
        s_probs = read_predictions(pdir / "predictions.csv", classes)
        z_probs = read_predictions(pdir / "predictions.csv", classes, prefix="zoom_prob_")
        t = json.loads((pdir / "timing.json").read_text())["slides"]
        ids = sorted(s for s in s_probs if s in labels and s_probs[s] is not None)
        y = np.array([classes.index(labels[s]) for s in ids])
        zp = []
        for s in ids:
            if z_probs.get(s) is None:
                fallback += 1
                zp.append(s_probs[s])
            else:
                zp.append(z_probs[s])
        for acc, probs in ((student, np.stack([s_probs[s] for s in ids])), (zoom, np.stack(zp))):
            m = classification_metrics(y, probs)
            for k in acc:
                acc[k].append(float(m[k]))
        high_patches += [t[s]["zoom"]["patches_high"] for s in ids if "zoom" in t[s]]
        high_total += [t[s]["zoom"]["patches_high_total"] for s in ids if "zoom" in t[s]]
        low_patches += [t[s]["patches_low"] for s in ids]
    saved = 1.0 - sum(high_patches) / sum(high_total) if sum(high_total) else math.nan
    return {
        "student_from_slides": {k: mean_ci(v) for k, v in student.items()},
        "zoom": {k: mean_ci(v) for k, v in zoom.items()},
        "zoom_high_patches_mean": statistics.fmean(high_patches) if high_patches else math.nan,
        "low_patches_mean": statistics.fmean(low_patches) if low_patches else math.nan,
        "high_cost_saved": saved,
        "fallback_to_student": fallback,
    }


def table(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    ids_test = test_ids(out)
    ids_timing = timing_ids(out, args.timing_slides)
    labels = {k: v for view in view_sites(out, "frozen") for k, v in labels_of(view).items()}
    metrics: dict[tuple[str, int], dict[str, Any]] = {}
    for config in CONFIGS:
        for seed in args.seeds:
            p = run_dir(out, config, seed) / "metrics.json"
            if p.is_file():
                metrics[(config, seed)] = json.loads(p.read_text())
    classes = next(iter(metrics.values()))["classes"] if metrics else sorted(set(labels.values()))
    low_frozen = patches_per_slide(out, ENCODER, "low", ids_test)
    high_frozen = patches_per_slide(out, ENCODER, "high", ids_test)
    t_high = timing_median(out, "timing_teacher_high", ids_timing)
    t_adapter = timing_median(out, "timing_adapter", ids_timing)
    t_pixel = timing_median(out, "timing_pixel_full", ids_timing)
    rows = []
    for key, (label, config, model, headline) in ROWS.items():
        per_seed: dict[str, list[float]] = {"auc": [], "balanced_acc": [], "brier": []}
        seeds_done = []
        for seed in args.seeds:
            m = metrics.get((config, seed))
            if m is None:
                continue
            test = next((r for r in m["rows"] if r["model"] == model and r.get("split", "test") == "test"), None)
            if test is None:
                continue
            seeds_done.append(seed)
            for k in per_seed:
                per_seed[k].append(float(test[k]) if finite(test.get(k)) else math.nan)
        if key == "teacher":
            patches, seconds = f"{high_frozen:.1f} (20×)", t_high
        elif config == "frozen":
            patches, seconds = f"{low_frozen:.1f}", t_adapter if key == "adapter" else math.nan
        else:
            patches, seconds = f"{low_frozen:.1f}", t_pixel if key == FULL else math.nan
        rows.append(
            {
                "key": key,
                "label": label,
                "config": config,
                "model": model,
                "headline": headline,
                "seeds": seeds_done,
                **{k: mean_ci(v) for k, v in per_seed.items()},
                "patches_per_slide": patches,
                "seconds_per_slide_median": seconds,
            }
        )
    by = {r["key"]: r for r in rows}
    teacher_auc = by["teacher"]["auc"]["values"]
    for r in rows:  # paired (same seed) AUC difference to the teacher
        if r["key"] != "teacher" and len(r["auc"]["values"]) == len(teacher_auc):
            r["auc_minus_teacher"] = mean_ci([a - b for a, b in zip(r["auc"]["values"], teacher_auc)])
    zoom = zoom_rows(out, args, labels, classes)
    zooms = {
        key: {"label": label.format(k=args.zoom_k, t=args.zoom_threshold), **zoom_rows(out, args, labels, classes, key)}
        for key, (label, *_rest) in zoom_runs(args).items()
    }
    ft_info = {
        v: json.loads((out / "finetune" / v / "finetune.json").read_text())
        for v in VARIANTS
        if (out / "finetune" / v / "finetune.json").is_file()
    }
    n_test = len(ids_test)
    y = [labels[s] for s in ids_test]
    targets = []
    t_mean = by["teacher"]["auc"]["mean"]
    for key in ("pixel", "pixel_att", "pixel_att_dd", FULL, "adapter"):
        s_mean = by[key]["auc"]["mean"]
        d = s_mean - (t_mean - AUC_MARGIN)
        targets.append(
            {
                "target": f"{by[key]['label']}: AUC ≥ teacher AUC − {AUC_MARGIN} (mean over seeds)",
                "measured": f"{fmt(s_mean)} vs {fmt(t_mean)} − {AUC_MARGIN} = {fmt(t_mean - AUC_MARGIN)} (Δ {d:+.3f})",
                "margin": d,
                "met": bool(finite(d) and d >= -1e-12),
            }
        )
    ratio = t_high / t_pixel if finite(t_high) and finite(t_pixel) and t_pixel > 0 else math.nan
    targets.append(
        {
            "target": f"low-res (full pixel student) ≥ {SPEED_TARGET:.0f}× faster per slide than high-res (medians)",
            "measured": f"{fmt(ratio, 1)}× ({fmt(t_high, 2)} s vs {fmt(t_pixel, 2)} s, {len(ids_timing)} slides)",
            "margin": ratio - SPEED_TARGET if finite(ratio) else math.nan,
            "met": bool(finite(ratio) and ratio >= SPEED_TARGET),
        }
    )
    doc = {
        "schema": "fedslide.bench.lowres_ablation/1",
        "setup": {
            "cohort": str(args.cohort),
            "seeds": args.seeds,
            "n_test": n_test,
            "test_class_counts": {c: y.count(c) for c in sorted(set(y))},
            "test_fraction": args.test_fraction,
            "timing_slides": ids_timing,
            "zoom_k": args.zoom_k,
            "zoom_threshold": args.zoom_threshold,
            "threads": args.threads,
            "ft_max_patches": args.ft_max_patches,
            "ft_epochs": args.ft_epochs,
            "pool_slides_per_site": args.pool_slides_per_site,
            "distill_set": args.distill_set,
            "configs": {k: {"view": v, "set": s} for k, v in CONFIGS.items() for v, s in [v]},
            "cpu_count": os.cpu_count(),
            "loadavg_end": os.getloadavg()[0],
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        "finetune": ft_info,
        "rows": rows,
        "zoom": zoom,
        "zooms": zooms,
        "speed": {
            "high_s_median": t_high,
            "adapter_low_s_median": t_adapter,
            "pixel_low_s_median": t_pixel,
            "ratio": ratio,
        },
        "targets": targets,
        "distill_seconds": {f"{c}/seed{s}": m.get("timings", {}).get("total") for (c, s), m in metrics.items()},
    }
    (out / "lowres_ablation.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    text = markdown(doc)
    (out / "lowres_ablation.md").write_text(text)
    print(text)
    return doc


def markdown(doc: dict[str, Any]) -> str:
    s = doc["setup"]
    lines = [
        f"Test split: {s['n_test']} slides ({s['test_class_counts']}), seeds {s['seeds']}; mean [95 % t-interval over "
        "seeds]; metrics on the feature files (`fedslide distill`, metrics.json).",
        "",
        "| row | AUC | balanced acc. | Brier | AUC − teacher (paired) | per-seed AUC | patches / slide | s / slide |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        diff = fmt_ci(r["auc_minus_teacher"]) if "auc_minus_teacher" in r else "—"
        per = " / ".join(fmt(v) for v in r["auc"]["values"])
        lines.append(
            f"| {r['label']} | {fmt_ci(r['auc'])} | {fmt_ci(r['balanced_acc'])} | {fmt_ci(r['brier'])} | {diff} | "
            f"{per} | {r['patches_per_slide']} | {fmt(r['seconds_per_slide_median'], 2)} |"
        )
    z = doc["zoom"]
    lines += [
        f"| full pixel student, end to end from the slides | {fmt_ci(z['student_from_slides']['auc'])} | "
        f"{fmt_ci(z['student_from_slides']['balanced_acc'])} | {fmt_ci(z['student_from_slides']['brier'])} | — | "
        f"{' / '.join(fmt(v) for v in z['student_from_slides']['auc']['values'])} | {fmt(z['low_patches_mean'], 1)} | — |",
        f"| + zoom top-{s['zoom_k']} (teacher on the children), from the slides | {fmt_ci(z['zoom']['auc'])} | "
        f"{fmt_ci(z['zoom']['balanced_acc'])} | {fmt_ci(z['zoom']['brier'])} | — | "
        f"{' / '.join(fmt(v) for v in z['zoom']['auc']['values'])} | {fmt(z['low_patches_mean'], 1)} + "
        f"{fmt(z['zoom_high_patches_mean'], 1)} (20×) | — |",
        "",
        "Zoom from the slides (the teacher on the high-res children of the selected 5× regions; the student's own "
        "label where no region passes): the same test slides and seeds.",
        "",
        "| zoom row | student AUC | + zoom AUC | + zoom balanced acc. | + zoom Brier | per-seed AUC | 20× patches "
        "encoded / slide | high-res cost saved | slides without a zoom label |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for zr in doc.get("zooms", {}).values():
        lines.append(
            f"| {zr['label']} | {fmt_ci(zr['student_from_slides']['auc'])} | {fmt_ci(zr['zoom']['auc'])} | "
            f"{fmt_ci(zr['zoom']['balanced_acc'])} | {fmt_ci(zr['zoom']['brier'])} | "
            f"{' / '.join(fmt(v) for v in zr['zoom']['auc']['values'])} | {fmt(zr['zoom_high_patches_mean'], 1)} | "
            f"{fmt(zr['high_cost_saved'], 3)} | {zr['fallback_to_student']} |"
        )
    lines += [
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in doc["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    lines.append("")
    for variant, f in doc["finetune"].items():
        loss = f["history"][-1].get("total") if f["history"] else None
        lines.append(
            f"- stage 1 `{variant}` ({', '.join(f['set'])}): {f['patches']} patches of {f['slides']} slides "
            f"(pool {f['pool_slides']}), {f['epochs']} epoch(s), {f['trainable_params']:,} trainable parameters, "
            f"{f['seconds']:.0f} s incl. teacher targets ({f['patches_per_s_incl_targets']:.2f} patches/s), final "
            f"loss {fmt(loss)}, weights sha256 {f['weights_hash'][:12]}"
        )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, required=True, help="cohort root with site*/ (preprocessed)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--step", choices=["all", "views", "finetune", "distill", "predict", "table"], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="distill configs")
    ap.add_argument("--test-fraction", type=float, default=0.25, help="share of each site carved as test")
    ap.add_argument("--ft-max-patches", type=int, default=384, help="5x patches of the pooled stage-1 fine-tune")
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument(
        "--pool-slides-per-site", type=int, default=None, help="stage-1 pool: first N train/val slides per site"
    )
    ap.add_argument("--variants", nargs="+", choices=[v for v, e in VARIANTS.items() if e], default=["ft", "ft_stain"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE", help="extra distill --set")
    ap.add_argument("--timing-slides", type=int, default=12)
    ap.add_argument("--zoom-k", type=int, default=2)
    ap.add_argument("--zoom-threshold", type=float, default=0.5, help="AHDMIL's pre-screen threshold (not tuned)")
    args = ap.parse_args(argv)
    args.cohort, out = args.cohort.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.step in ("all", "views"):
        make_views(cohort_sites(args.cohort), out, args.test_fraction)
    if args.step in ("all", "finetune"):
        finetune(out, args)
    if args.step in ("all", "distill"):
        distill(out, args)
    if args.step in ("all", "predict"):
        predict(out, args)
    if args.step in ("all", "table"):
        table(out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
