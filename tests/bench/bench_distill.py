"""High -> low distillation evidence (issue 4): one table from a `fedslide distill` run and `fedslide predict`.

    python tests/bench/bench_distill.py --sites C/site1 C/site2 C/site3 --out OUT \
        [--epochs N] [--zoom-k 2] [--threads 1] [--reuse-run] [--distill-set KEY=VALUE ...]

Run on demand (not collected by pytest). Steps:
1. `fedslide distill --sites ... --out OUT/run` (torch threads = --threads): teacher (high-res),
   low-res baseline (same student architecture, labels only), LRMIL student (stage 1 + teacher KD)
   and LRMIL + D&D student; OUT/run/metrics.json holds their test metrics *on feature files*.
2. The test-split slides of every site (labels.csv split = test) are gathered as symlinks in
   OUT/test_slides and predicted *end to end from the slide files* with `fedslide predict`:
   the LRMIL + D&D student at low res, the same with `--zoom K`, the teacher with
   `--resolution high` (same encoder), and the baseline_low and lrmil_student bundles at low res.
3. AUC, accuracy, F1, Brier (common.metrics) from predictions.csv vs the labels, a stratified
   bootstrap 95 % CI of each AUC and of the paired AUC differences the targets compare; patches
   per slide and median / mean end-to-end seconds per slide from timing.json.
4. OUT/distill_table.json and OUT/distill_table.md: five rows (teacher high-res, low-res baseline,
   LRMIL student, LRMIL + D&D student, zoom), predict-time and distill-time metrics, the speed
   ratio (high-res s/slide / low-res s/slide) and whether each target is met:
   - LRMIL + D&D student AUC >= low-res baseline AUC;
   - LRMIL + D&D student AUC >= teacher AUC - 0.02;
   - low-res inference >= 10x faster per slide than high-res inference with the same encoder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedslide.client.slides import discover_slides
from fedslide.common.config.preprocess import SlideConfig
from fedslide.common.metrics import classification_metrics, roc_auc

AUC_MARGIN = 0.02
SPEED_TARGET = 10.0

# row key -> (label in the table, bundle dir inside the run, predict options, distill metrics row)
ROWS: dict[str, tuple[str, str, list[str], str | None]] = {
    "teacher_high": ("teacher (high-res)", "student", ["--resolution", "high"], "teacher_high"),
    "baseline_low": ("low-res baseline (labels only)", "baseline_low", [], "baseline_low"),
    "lrmil_student": ("LRMIL student (stage 1 + teacher KD)", "lrmil_student", [], "lrmil_student"),
    "lrmil_dd_student": ("LRMIL + D&D student", "student", [], "lrmil_dd_student"),
    "zoom": ("LRMIL + D&D student + zoom (teacher on top-K)", "student", [], None),
}


def fedslide(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedslide.deploy.cli", *args]


def run_logged(cmd: list[str], log_path: Path, threads: int) -> tuple[int, float]:
    """Run a command with its output in log_path; (exit code, wall seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[2]
        )
    seconds = time.perf_counter() - start
    print(f"  exit {rc} after {seconds:.1f} s (log: {log_path})", flush=True)
    return rc, seconds


# ---------------------------------------------------------------- test slides and labels


def gather_test_slides(sites: list[Path], dest: Path) -> dict[str, str]:
    """Symlink every site's split=test slides into dest; slide_id -> label."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    exts = SlideConfig().extensions
    labels: dict[str, str] = {}
    for site in sites:
        files = {p.stem: p for p in discover_slides(site / "slides", exts)}
        with (site / "labels.csv").open(newline="") as fh:
            for row in csv.DictReader(fh):
                if (row.get("split") or "").strip().lower() != "test":
                    continue
                sid = row["slide_id"].strip()
                if sid not in files:
                    raise SystemExit(f"{site}: test slide {sid} has no file in {site / 'slides'}")
                if sid in labels:
                    raise SystemExit(f"slide id {sid} is in more than one site; cannot gather into one folder")
                (dest / files[sid].name).symlink_to(files[sid].resolve())
                labels[sid] = row["label"].strip()
    if not labels:
        raise SystemExit("no slide has split = test in the sites' labels.csv")
    return labels


def read_predictions(path: Path, classes: list[str], prefix: str = "prob_") -> dict[str, np.ndarray | None]:
    """slide_id -> probability vector from predictions.csv (None where the columns are empty)."""
    out: dict[str, np.ndarray | None] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            cells = [row.get(f"{prefix}{c}", "") for c in classes]
            out[row["slide_id"]] = None if any(c in ("", None) for c in cells) else np.array([float(c) for c in cells])
    return out


# ---------------------------------------------------------------- statistics


def bootstrap_auc(
    y: np.ndarray, probs: dict[str, np.ndarray], pairs: list[tuple[str, str]], n_boot: int, seed: int
) -> dict[str, Any]:
    """Stratified percentile bootstrap of each AUC and of paired AUC differences (same resampled slides)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    aucs: dict[str, list[float]] = {k: [] for k in probs}
    diffs: dict[str, list[float]] = {f"{a}-{b}": [] for a, b in pairs}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(ix, size=ix.size, replace=True) for ix in by_class])
        cur = {k: roc_auc(y[idx], p[idx]) for k, p in probs.items()}
        for k, v in cur.items():
            aucs[k].append(v)
        for a, b in pairs:
            diffs[f"{a}-{b}"].append(cur[a] - cur[b])

    def summary(values: list[float], threshold: float | None = None) -> dict[str, float]:
        v = np.array([x for x in values if math.isfinite(x)])
        out = {"lo": float(np.percentile(v, 2.5)), "hi": float(np.percentile(v, 97.5)), "sd": float(v.std(ddof=1))}
        if threshold is not None:
            out["p_ge"] = float(np.mean(v >= threshold - 1e-12))
            out["p_gt"] = float(np.mean(v > threshold + 1e-12))
        return out

    return {
        "n_boot": n_boot,
        "auc": {k: summary(v) for k, v in aucs.items()},
        "diff": {k: summary(v, -AUC_MARGIN if k.endswith("-teacher_high") else 0.0) for k, v in diffs.items()},
    }


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial CI of a proportion k / n."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley & McNeil 1982)."""
    if not math.isfinite(auc) or n_pos == 0 or n_neg == 0:
        return math.nan
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


# ---------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    s = doc["setup"]
    lines = [
        "# High -> low distillation: evidence table",
        "",
        f"Cohort: {s['sites']} sites, {s['slides_total']} slides ({s['split_counts']}); test split: "
        f"{s['n_test']} slides ({s['test_class_counts']}), gathered from all sites. Encoder {s['encoder']}; "
        f"teacher {s['teacher_model']}, students {s['student_model']} (student input: {s['student_input']}); "
        f"max epochs {s['epochs']}; torch threads {s['threads']}; CPU only.",
        "",
        "## End to end from the slide files (`fedslide predict`, test split)",
        "",
        "| model | AUC [95% CI] | accuracy | F1 | Brier | patches / slide | s / slide, median (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["predict"]
        ci = r["predict"].get("auc_ci95")
        auc = fmt(p["auc"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        lines.append(
            f"| {r['label']} | {auc} | {fmt(p['acc'])} | {fmt(p['f1'])} | {fmt(p['brier'])} | {r['patches_text']} | "
            f"{fmt(p['seconds_median'], 2)} ({fmt(p['seconds_mean'], 2)}) |"
        )
    lines += [
        "",
        "## On the feature files (`fedslide distill`, `metrics.json`, same test split)",
        "",
        "| model | input | AUC | accuracy | F1 | Brier | instances / slide |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r.get("distill")
        if not d:
            lines.append(f"| {r['label']} | — | — | — | — | — | — |")
            continue
        lines.append(
            f"| {r['label']} | {d['input']} | {fmt(d['auc'])} | {fmt(d['acc'])} | {fmt(d['f1'])} | "
            f"{fmt(d['brier'])} | {fmt(d.get('instances_per_slide'), 1)} |"
        )
    sp = doc["speed"]
    lines += [
        "",
        "## Speed (same encoder, same slides, end to end from the slide file)",
        "",
        f"- high-res (teacher) {fmt(sp['high_s_median'], 2)} s/slide median, {fmt(sp['high_s_mean'], 2)} mean; "
        f"low-res (LRMIL + D&D student) {fmt(sp['low_s_median'], 2)} median, {fmt(sp['low_s_mean'], 2)} mean.",
        f"- speed ratio high / low, first timed run: **{fmt(sp['ratio_median'], 1)}×** (medians), {fmt(sp['ratio_mean'], 1)}× (means), "
        f"median of per-slide ratios {fmt(sp['ratio_per_slide_median'], 1)}×; encoded patches high / low: "
        f"{fmt(sp['patch_ratio'], 1)}× (the 4 × 4 nesting allows at most 16×).",
        "- timed runs (high s/slide / low s/slide, medians): "
        + "; ".join(
            f"#{r['repeat']} {r['high_s_median']:.2f} / {r['low_s_median']:.2f} = {r['ratio']:.1f}×"
            for r in sp["repeats"]
        )
        + f"; median {fmt(sp['ratio_over_repeats_median'], 1)}×.",
        f"- where the time goes (medians): patch reading + encoding high {fmt(sp['high_read_encode_s_median'], 2)} s "
        f"vs low {fmt(sp['low_read_encode_s_median'], 2)} s ({fmt(sp['read_encode_ratio_median'], 1)}×); thumbnail + "
        f"tissue + grid high {fmt(sp['high_thumbnail_tissue_s_median'], 2)} s vs low "
        f"{fmt(sp['low_thumbnail_tissue_s_median'], 2)} s (paid by both).",
        f"- zoom top-{doc['setup']['zoom_k']}: {fmt(sp['zoom_s_median'], 2)} s/slide median (low pass + zoom), "
        f"{fmt(sp['zoom_high_patches_mean'], 1)} high-res patches/slide of {fmt(sp['high_patches_mean'], 1)} "
        f"({fmt(sp['zoom_cost_saved'], 3)} of the high-res encoding saved).",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in doc["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    lines += ["", "## Uncertainty", ""]
    for note in doc["notes"]:
        lines.append(f"- {note}")
    lines += [
        "",
        f"Distill wall time {fmt(doc['timings']['distill_s'], 0)} s"
        + (" (reused run: its metrics.json total)" if doc["timings"].get("distill_reused") else "")
        + "; predict runs "
        + ", ".join(f"{k} {fmt(v, 0)} s" for k, v in doc["timings"]["predict_s"].items())
        + f". Load average (1 min) during the runs: {doc['setup']['loadavg_text']}.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", nargs="+", type=Path, required=True, help="site directories (preprocessed)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (run/, predict/, distill_table.*)")
    ap.add_argument(
        "--epochs", type=int, default=None, help="max epochs of teacher, experts, students (distill --epochs)"
    )
    ap.add_argument("--zoom-k", type=int, default=2, help="K of the zoom row (predict --zoom K)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of distill and predict")
    ap.add_argument("--seed", type=int, default=0, help="distill seed and bootstrap seed")
    ap.add_argument("--workers", type=int, default=None, help="predict --workers (default: predict's default)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the AUC CIs")
    ap.add_argument(
        "--timing-repeats",
        type=int,
        default=3,
        help="times the high-res and low-res D&D predict runs are timed (speed ratio: median over them)",
    )
    ap.add_argument("--reuse-run", action="store_true", help="skip distill when OUT/run/metrics.json exists")
    ap.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE", help="extra distill --set")
    args = ap.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sites = [s.resolve() for s in args.sites]
    run_dir = out / "run"
    loadavg: dict[str, float] = {"start": os.getloadavg()[0]}
    timings: dict[str, Any] = {"predict_s": {}}

    # 1. distill
    if args.reuse_run and (run_dir / "metrics.json").is_file():
        print(f"reusing {run_dir}/metrics.json", flush=True)
        timings["distill_s"] = json.loads((run_dir / "metrics.json").read_text())["timings"].get("total")
        timings["distill_reused"] = True
    else:
        cmd = fedslide(
            "distill",
            "--sites",
            *map(str, sites),
            "--out",
            str(run_dir),
            "--seed",
            str(args.seed),
            "--no-progress",
            "--set",
            f"threads={args.threads}",
        )
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        for kv in args.distill_set:
            cmd += ["--set", kv]
        rc, seconds = run_logged(cmd, out / "logs" / "distill.log", args.threads)
        if rc != 0:
            print(f"distill failed (exit {rc}); see {out / 'logs' / 'distill.log'}", file=sys.stderr)
            return 1
        timings["distill_s"] = seconds
    loadavg["after_distill"] = os.getloadavg()[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    classes: list[str] = list(metrics["classes"])

    # 2. test slides and predict runs
    labels = gather_test_slides(sites, out / "test_slides")
    unknown = sorted({v for v in labels.values() if v not in classes})
    if unknown:
        raise SystemExit(f"test labels {unknown} are not among the model's classes {classes}")
    predict_dirs = {
        "lrmil_dd_student": ("student", []),
        "zoom": ("student", ["--zoom", str(args.zoom_k)]),
        "teacher_high": ("student", ["--resolution", "high"]),
        "baseline_low": ("baseline_low", []),
        "lrmil_student": ("lrmil_student", []),
    }

    def predict(key: str, bundle: str, extra: list[str], dest: Path, log_name: str) -> bool:
        if dest.exists():
            shutil.rmtree(dest)
        cmd = fedslide(
            "predict",
            "--slides",
            str(out / "test_slides"),
            "--model",
            str(run_dir / bundle),
            "--out",
            str(dest),
            "--no-heatmaps",
            "--no-progress",
            "--device",
            "cpu",
            "--set",
            f"threads={args.threads}",
            *extra,
        )
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        rc, seconds = run_logged(cmd, out / "logs" / f"{log_name}.log", args.threads)
        timings["predict_s"][log_name.removeprefix("predict_")] = seconds
        loadavg[f"after_{log_name.removeprefix('predict_')}"] = os.getloadavg()[0]
        if rc not in (0, 3):
            print(f"predict {key} failed (exit {rc}); see {out / 'logs' / f'{log_name}.log'}", file=sys.stderr)
            return False
        return True

    for key, (bundle, extra) in predict_dirs.items():
        if not predict(key, bundle, extra, out / "predict" / key, f"predict_{key}"):
            return 1
    # timing repeats: the high-res teacher and the low-res D&D student again (alternating order), so the
    # speed ratio is not one draw of a shared, noisy machine
    repeat_dirs: list[dict[str, Path]] = [
        {"lrmil_dd_student": out / "predict" / "lrmil_dd_student", "teacher_high": out / "predict" / "teacher_high"}
    ]
    for rep in range(2, args.timing_repeats + 1):
        order = ["teacher_high", "lrmil_dd_student"] if rep % 2 == 0 else ["lrmil_dd_student", "teacher_high"]
        dirs = {}
        for key in order:
            bundle, extra = predict_dirs[key]
            dirs[key] = out / "predict" / f"timing_rep{rep}" / key
            if not predict(key, bundle, extra, dirs[key], f"predict_{key}_rep{rep}"):
                return 1
        repeat_dirs.append(dirs)

    # 3. metrics
    ids_all = sorted(labels)
    rows: list[dict[str, Any]] = []
    probs_for_boot: dict[str, np.ndarray] = {}
    timing_docs: dict[str, dict[str, Any]] = {}
    common_ids = set(ids_all)
    for key in ROWS:
        pdir = out / "predict" / key
        timing_docs[key] = json.loads((pdir / "timing.json").read_text())
        common_ids &= set(timing_docs[key]["slides"])
    missing = sorted(set(ids_all) - common_ids)
    ids = sorted(common_ids)
    y = np.array([classes.index(labels[s]) for s in ids])
    distill_models = metrics.get("models", {})
    distill_rows = {r["model"]: r for r in metrics["rows"]}
    zoom_fallback = 0
    for key, (label, bundle, _, distill_key) in ROWS.items():
        pdir = out / "predict" / key
        tdoc = timing_docs[key]
        slides_t = tdoc["slides"]
        if key == "zoom":
            student = read_predictions(pdir / "predictions.csv", classes)
            zprobs = read_predictions(pdir / "predictions.csv", classes, prefix="zoom_prob_")
            probs_list = []
            for s in ids:
                if zprobs.get(s) is None:  # no region had high-res children: the student's answer stands
                    zoom_fallback += 1
                    probs_list.append(student[s])
                else:
                    probs_list.append(zprobs[s])
            probs = np.stack(probs_list)
            seconds = [slides_t[s]["total_with_zoom_s"] for s in ids]
            low_p = [slides_t[s]["patches_low"] for s in ids]
            high_p = [slides_t[s]["zoom"]["patches_high"] for s in ids]
            patches = {"low": statistics.fmean(low_p), "high": statistics.fmean(high_p)}
            patches_text = f"{patches['low']:.1f} low + {patches['high']:.1f} high"
            extra = {
                "zoom_k": args.zoom_k,
                "low_pass_s_median": statistics.median(slides_t[s]["total_s"] for s in ids),
                "zoom_s_median": statistics.median(slides_t[s]["zoom"]["seconds"] for s in ids),
                "zoom_cost_saved": tdoc["summary"].get("zoom", {}).get("cost_saved"),
                "zoom_fallback_to_student": zoom_fallback,
                "agree_with_student": int(
                    sum(
                        int(np.argmax(zprobs[s])) == int(np.argmax(student[s]))
                        for s in ids
                        if zprobs.get(s) is not None
                    )
                ),
            }
        else:
            pred = read_predictions(pdir / "predictions.csv", classes)
            probs = np.stack([pred[s] for s in ids])
            seconds = [slides_t[s]["total_s"] for s in ids]
            res = "high" if key == "teacher_high" else "low"
            patches = {res: statistics.fmean(slides_t[s]["patches"] for s in ids)}
            patches_text = f"{patches[res]:.1f} {res}"
            extra = {}
        m = classification_metrics(y, probs)
        probs_for_boot[key] = probs
        row: dict[str, Any] = {
            "key": key,
            "label": label,
            "bundle": bundle,
            "patches_text": patches_text,
            "predict": {
                **m,
                "n": len(ids),
                "patches_per_slide": patches,
                "seconds_median": statistics.median(seconds),
                "seconds_mean": statistics.fmean(seconds),
                "seconds_per_slide": dict(zip(ids, seconds)),
                "read_encode_s_median": statistics.median(slides_t[s]["read_encode_s"] for s in ids),
                "thumbnail_tissue_s_median": statistics.median(slides_t[s]["thumbnail_tissue_s"] for s in ids),
                "model_s_median": statistics.median(slides_t[s]["model_s"] for s in ids),
                "process_wall_s": timings["predict_s"][key],
                "probs": {s: [round(float(v), 6) for v in p] for s, p in zip(ids, probs)},
                **extra,
            },
        }
        if distill_key and distill_key in distill_rows:
            d = distill_rows[distill_key]
            row["distill"] = {
                "input": d.get("input"),
                **{k: d.get(k) for k in ("auc", "acc", "balanced_acc", "f1", "brier", "ece", "loss", "n")},
                "instances_per_slide": distill_models.get(distill_key, {}).get("instances_per_slide"),
                "best_epoch": distill_models.get(distill_key, {}).get("best_epoch"),
                "epochs_run": distill_models.get(distill_key, {}).get("epochs_run"),
                "val": distill_models.get(distill_key, {}).get("val"),
            }
        rows.append(row)

    # bootstrap CIs
    pairs = [
        ("lrmil_dd_student", "baseline_low"),
        ("lrmil_dd_student", "teacher_high"),
        ("lrmil_student", "baseline_low"),
    ]
    boot = bootstrap_auc(y, probs_for_boot, pairs, args.bootstrap, args.seed)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    for row in rows:
        ci = boot["auc"][row["key"]]
        row["predict"]["auc_ci95"] = [ci["lo"], ci["hi"]]
        row["predict"]["auc_se_hanley_mcneil"] = (
            hanley_mcneil_se(row["predict"]["auc"], n_pos, n_neg) if len(classes) == 2 else None
        )

    for row in rows:
        k = int(round(row["predict"]["acc"] * len(ids)))
        row["predict"]["acc_correct"] = k
        row["predict"]["acc_ci95_clopper_pearson"] = list(clopper_pearson(k, len(ids)))

    by = {r["key"]: r for r in rows}
    dd, base, teach, zoomr = by["lrmil_dd_student"], by["baseline_low"], by["teacher_high"], by["zoom"]

    # speed
    per_slide_ratio = [teach["predict"]["seconds_per_slide"][s] / dd["predict"]["seconds_per_slide"][s] for s in ids]
    repeats = []
    for rep, dirs in enumerate(repeat_dirs, start=1):
        med = {}
        for key, d in dirs.items():
            t = json.loads((d / "timing.json").read_text())["slides"]
            med[key] = statistics.median(t[s]["total_s"] for s in ids if s in t)
        repeats.append(
            {
                "repeat": rep,
                "high_s_median": med["teacher_high"],
                "low_s_median": med["lrmil_dd_student"],
                "ratio": med["teacher_high"] / med["lrmil_dd_student"],
            }
        )
    speed = {
        "high_s_median": teach["predict"]["seconds_median"],
        "high_s_mean": teach["predict"]["seconds_mean"],
        "low_s_median": dd["predict"]["seconds_median"],
        "low_s_mean": dd["predict"]["seconds_mean"],
        "ratio_median": teach["predict"]["seconds_median"] / dd["predict"]["seconds_median"],
        "ratio_mean": teach["predict"]["seconds_mean"] / dd["predict"]["seconds_mean"],
        "ratio_per_slide_median": statistics.median(per_slide_ratio),
        "ratio_per_slide_min": min(per_slide_ratio),
        "high_patches_mean": teach["predict"]["patches_per_slide"]["high"],
        "low_patches_mean": dd["predict"]["patches_per_slide"]["low"],
        "patch_ratio": teach["predict"]["patches_per_slide"]["high"] / dd["predict"]["patches_per_slide"]["low"],
        "zoom_s_median": zoomr["predict"]["seconds_median"],
        "zoom_high_patches_mean": zoomr["predict"]["patches_per_slide"]["high"],
        "zoom_cost_saved": zoomr["predict"]["zoom_cost_saved"],
        "high_read_encode_s_median": teach["predict"]["read_encode_s_median"],
        "low_read_encode_s_median": dd["predict"]["read_encode_s_median"],
        "high_thumbnail_tissue_s_median": teach["predict"]["thumbnail_tissue_s_median"],
        "low_thumbnail_tissue_s_median": dd["predict"]["thumbnail_tissue_s_median"],
        "read_encode_ratio_median": teach["predict"]["read_encode_s_median"] / dd["predict"]["read_encode_s_median"],
        "repeats": repeats,
        "ratio_over_repeats_median": statistics.median(r["ratio"] for r in repeats),
        "ratio_over_repeats_min": min(r["ratio"] for r in repeats),
        "ratio_over_repeats_max": max(r["ratio"] for r in repeats),
    }

    # targets (end to end from the slides; the feature-file check is reported alongside)
    def auc_of(r: dict[str, Any], where: str) -> float:
        v = (r.get(where) or {}).get("auc")
        return float(v) if finite(v) else math.nan

    targets = []
    for where, what in (("predict", "slides, end to end"), ("distill", "feature files")):
        a_dd, a_base, a_t = auc_of(dd, where), auc_of(base, where), auc_of(teach, where)
        d1, d2 = a_dd - a_base, a_dd - (a_t - AUC_MARGIN)
        targets.append(
            {
                "target": f"D&D student AUC ≥ low-res baseline AUC ({what})",
                "where": where,
                "margin": d1,
                "measured": f"{fmt(a_dd)} vs {fmt(a_base)} (Δ {d1:+.3f})",
                "met": bool(finite(d1) and d1 >= -1e-12),
            }
        )
        targets.append(
            {
                "target": f"D&D student AUC ≥ teacher AUC − {AUC_MARGIN} ({what})",
                "where": where,
                "margin": d2,
                "measured": f"{fmt(a_dd)} vs {fmt(a_t)} − {AUC_MARGIN} = {fmt(a_t - AUC_MARGIN)} (Δ {d2:+.3f})",
                "met": bool(finite(d2) and d2 >= -1e-12),
            }
        )
    targets.append(
        {
            "target": f"low-res ≥ {SPEED_TARGET:.0f}× faster per slide than high-res (medians, end to end)",
            "where": "predict",
            "margin": speed["ratio_over_repeats_median"] - SPEED_TARGET,
            "measured": f"{speed['ratio_over_repeats_median']:.1f}× (median over {len(repeats)} timed runs, range "
            f"{speed['ratio_over_repeats_min']:.1f}–{speed['ratio_over_repeats_max']:.1f}×; first run "
            f"{fmt(speed['high_s_median'], 2)} s vs {fmt(speed['low_s_median'], 2)} s)",
            "met": bool(speed["ratio_over_repeats_median"] >= SPEED_TARGET),
        }
    )

    # notes on uncertainty
    d_base = boot["diff"]["lrmil_dd_student-baseline_low"]
    d_teach = boot["diff"]["lrmil_dd_student-teacher_high"]
    notes = [
        f"{len(ids)} test slides ({n_pos} {classes[1] if len(classes) > 1 else ''}, {n_neg} {classes[0]}): "
        f"one slide moves accuracy by {1 / len(ids):.3f}; one discordant positive-negative pair moves AUC by "
        f"{1 / max(n_pos * n_neg, 1):.4f}.",
        f"AUC 95% CIs are stratified percentile bootstraps ({args.bootstrap} resamples, seed {args.seed}); "
        f"Hanley-McNeil SE of the D&D student's AUC: {fmt(dd['predict']['auc_se_hanley_mcneil'])}.",
        f"Paired bootstrap of AUC(D&D) − AUC(baseline): 95% CI [{d_base['lo']:+.3f}, {d_base['hi']:+.3f}], "
        f"≥ 0 in {d_base['p_ge']:.0%} of resamples, > 0 in {d_base['p_gt']:.0%}.",
        f"Paired bootstrap of AUC(D&D) − AUC(teacher): 95% CI [{d_teach['lo']:+.3f}, {d_teach['hi']:+.3f}], "
        f"≥ −{AUC_MARGIN} in {d_teach['p_ge']:.0%} of resamples.",
    ]
    perfect = [r["label"] for r in rows if finite(r["predict"]["auc"]) and r["predict"]["auc"] >= 1.0 - 1e-12]
    if perfect:
        notes.append(
            f"AUC 1.000 ({', '.join(perfect)}) is perfect separation of the {len(ids)} test slides; the bootstrap "
            "and Hanley-McNeil intervals collapse to a point there and understate the uncertainty."
        )
    by_correct: dict[int, list[str]] = {}
    for r in rows:
        by_correct.setdefault(r["predict"]["acc_correct"], []).append(r["label"])
    for k, names in sorted(by_correct.items(), reverse=True):
        lo, hi = clopper_pearson(k, len(ids))
        notes.append(
            f"accuracy {k}/{len(ids)} ({', '.join(names)}): exact (Clopper-Pearson) 95% CI [{lo:.3f}, {hi:.3f}]."
        )
    if missing:
        notes.append(f"{len(missing)} test slide(s) failed in at least one predict run and are left out: {missing}")
    if zoom_fallback:
        notes.append(
            f"zoom: {zoom_fallback} slide(s) had no high-res children in the top-{args.zoom_k} regions; "
            "the student's probabilities are used for them"
        )

    split_counts = metrics.get("slides", {})
    test_counts = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    loadavg["end"] = os.getloadavg()[0]
    setup = {
        "sites": len(sites),
        "site_dirs": [str(s) for s in sites],
        "slides_total": sum(split_counts.get(k, 0) for k in ("train", "val", "test")),
        "split_counts": ", ".join(f"{k} {split_counts.get(k)}" for k in ("train", "val", "test")),
        "n_test": len(ids),
        "test_class_counts": ", ".join(f"{v} {k}" for k, v in test_counts.items()),
        "classes": classes,
        "encoder": (metrics.get("encoder") or {}).get("encoder_name"),
        "teacher_model": (metrics.get("teacher") or {}).get("name"),
        "student_model": (metrics.get("student") or {}).get("name"),
        "student_input": (metrics.get("kd") or {}).get("student_input"),
        "epochs": args.epochs if args.epochs else (metrics.get("config", {}).get("training", {}) or {}).get("epochs"),
        "zoom_k": args.zoom_k,
        "threads": args.threads,
        "predict_workers": timing_docs["teacher_high"].get("num_workers"),
        "predict_batch_size": timing_docs["teacher_high"].get("batch_size"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_1min": loadavg,
        "loadavg_text": ", ".join(f"{k} {v:.1f}" for k, v in loadavg.items()),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    doc = {
        "schema": "fedslide.bench.distill_table/1",
        "setup": setup,
        "rows": rows,
        "speed": speed,
        "targets": targets,
        "bootstrap": boot,
        "notes": notes,
        "distill_metrics": {k: metrics.get(k) for k in ("adapter", "clusters", "experts", "kd", "slides", "timings")},
        "timings": timings,
    }
    (out / "distill_table.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    text = markdown(doc)
    (out / "distill_table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
