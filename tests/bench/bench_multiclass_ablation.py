"""The distillation ablation's feature-level rows, leave-one-site-out, on a multi-class cohort (issue 34, part 3).

    python tests/bench/bench_multiclass_ablation.py --cohort /tmp/loso34/cohort --out OUT [--seeds 0 1 2]
        [--folds site1 ...] [--configs base att] [--step all|views|distill|table] [--threads 1]
        [--bootstrap 1000] [--encoder efficientnet_lite0] [--distill-set KEY=VALUE ...]

Run on demand (not collected by pytest); finished runs are reused, so `--folds site1 --seeds 0` times one fold
(and tables that fold alone) and a later call adds the rest. Centralized `fedslide distill` on the cohort's frozen-encoder feature files (no
pixel stage 1), with the binary ablation's rows (tests/bench/bench_lowres_ablation.py) that need no pixels:

1. views: OUT/views/<held-out site>/<site>/ links each site's slides and features; its labels.csv puts every
   slide of the held-out site in the test split and every other site's slides in train (its val rows stay val),
   so each fold trains on three sites and tests on the fourth (nothing is tuned on the test slides: distill's
   defaults, its val split for early stopping and temperature).
2. distill: one run per (config, held-out site, seed) into OUT/runs/<config>/<held-out>/seed<s>; each writes
   test_predictions.csv (every model's class probabilities on the held-out slides).
3. table: OUT/multiclass_ablation.{json,md}: per row the held-out slides of all folds pooled (96 on a 4 x 24
   cohort): macro one-vs-rest AUC, balanced accuracy and Brier with a 95 % stratified bootstrap interval per seed,
   the mean over seeds with a 95 % t-interval, the paired AUC difference to the teacher, and the wall time per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from bench_distill import finite, fmt, run_logged
from bench_lowres_ablation import ENCODER, distill_cmd, fmt_ci, mean_ci

from fedslide.common.distillation.split_predictions import TEST_PREDICTIONS_FILE, read_test_predictions
from fedslide.common.evaluation.stats import bootstrap_metrics
from fedslide.common.training.labels import read_labels

METRICS = ("auc", "balanced_acc", "brier")
LRMIL_STAGE2 = ["kd.lambda-attention=1", "kd.lambda-instance=1"]
# distill config -> distill --set (frozen 5x features, the adapter student)
CONFIGS: dict[str, list[str]] = {"base": [], "att": LRMIL_STAGE2}
# row key -> (label, distill config, model in test_predictions.csv, headline row)
ROWS: dict[str, tuple[str, str, str, bool]] = {
    "teacher": ("teacher (20×)", "base", "teacher_high", True),
    "baseline": ("labels-only low-res baseline (frozen 5× features)", "base", "baseline_low", True),
    "adapter": ("frozen adapter + logit KD (LRMIL student)", "base", "lrmil_student", True),
    "adapter_att": ("+ attention KD + instance loss (λ 1 each)", "att", "lrmil_student", True),
    "adapter_att_dd": ("+ D&D", "att", "lrmil_dd_student", True),
    "adapter_dd": ("(extra) frozen adapter + D&D, no attention KD", "base", "lrmil_dd_student", False),
}


def cohort_sites(cohort: Path) -> list[Path]:
    sites = sorted(p for p in cohort.glob("site*") if (p / "labels.csv").is_file())
    if len(sites) < 2:
        raise SystemExit(f"{cohort}: needs two or more site*/labels.csv, found {len(sites)}")
    return sites


def fold_rows(site: Path, held_out: bool) -> list[dict[str, str]]:
    """labels.csv rows of one site in one fold: all test when held out, else train (val rows kept)."""
    table = read_labels(site / "labels.csv")
    rows = []
    for r in table.rows:
        split = "test" if held_out else ("val" if r.split == "val" else "train")
        rows.append({"slide_id": r.slide_id, "label": r.label, "split": split, "patient_id": r.patient_id})
    return rows


def make_views(sites: list[Path], out: Path) -> None:
    """OUT/views/<held-out>/<site>/: links to the site's slides and features and the fold's labels.csv."""
    for held in sites:
        for site in sites:
            view = out / "views" / held.name / site.name
            view.mkdir(parents=True, exist_ok=True)
            for name in ("slides", "features"):
                link = view / name
                if not link.is_symlink() and (site / name).exists():
                    link.symlink_to((site / name).absolute(), target_is_directory=True)
            with (view / "labels.csv").open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["slide_id", "label", "split", "patient_id"])
                w.writeheader()
                w.writerows(fold_rows(site, site == held))
        print(f"fold {held.name}: views under {out / 'views' / held.name}", flush=True)


def folds(out: Path, wanted: list[str] | None) -> list[str]:
    names = sorted(p.name for p in (out / "views").glob("site*"))
    return [f for f in names if wanted is None or f in wanted]


def run_dir(out: Path, config: str, fold: str, seed: int) -> Path:
    return out / "runs" / config / fold / f"seed{seed}"


def distill(out: Path, args: argparse.Namespace) -> None:
    for seed in args.seeds:
        for fold in folds(out, args.folds):
            for config in args.configs:
                dest = run_dir(out, config, fold, seed)
                if (dest / TEST_PREDICTIONS_FILE).is_file() and (dest / "metrics.json").is_file():
                    continue
                sites = sorted((out / "views" / fold).glob("site*"))
                sets = [f"encoder={args.encoder}", *CONFIGS[config], *args.distill_set]
                cmd = distill_cmd(sites, dest, seed, args.threads, sets)
                rc, seconds = run_logged(cmd, out / "logs" / f"distill_{config}_{fold}_seed{seed}.log", args.threads)
                if rc != 0:
                    raise SystemExit(f"distill {config} {fold} seed {seed} failed (exit {rc}); see {out / 'logs'}")
                (dest / "wall_seconds.json").write_text(json.dumps({"wall_s": seconds}) + "\n")


def pooled(out: Path, config: str, model: str, seed: int, fold_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) of `model` on the held-out slides of every fold of (config, seed), pooled."""
    ys, ps, classes = [], [], None
    for fold in fold_names:
        names, rows = read_test_predictions(run_dir(out, config, fold, seed) / TEST_PREDICTIONS_FILE)
        if classes is not None and names != classes:
            raise SystemExit(f"{config}/{fold}/seed{seed}: class order {names} differs from {classes}")
        classes = names
        for r in rows:
            if r["model"] == model:
                ys.append(names.index(r["label"]))
                ps.append([float(r[f"prob_{c}"]) for c in names])
    return np.array(ys, dtype=np.int64), np.array(ps, dtype=np.float64).reshape(len(ys), -1)


def complete(out: Path, config: str, seed: int, fold_names: list[str]) -> bool:
    return all((run_dir(out, config, f, seed) / TEST_PREDICTIONS_FILE).is_file() for f in fold_names)


def table(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    fold_names = folds(out, args.folds)  # --folds: a table of those folds only (e.g. the one-fold estimate)
    rows: list[dict[str, Any]] = []
    teacher_auc: dict[int, float] = {}
    classes: list[str] = []
    n_test = 0
    for key, (label, config, model, headline) in ROWS.items():
        per_seed: dict[str, list[float]] = {m: [] for m in METRICS}
        boot: dict[int, dict[str, Any]] = {}
        for seed in args.seeds:
            if not complete(out, config, seed, fold_names):
                continue
            y, p = pooled(out, config, model, seed, fold_names)
            if not len(y):
                continue
            classes = read_test_predictions(run_dir(out, config, fold_names[0], seed) / TEST_PREDICTIONS_FILE)[0]
            n_test = len(y)
            ci = bootstrap_metrics(y, p, n_boot=args.bootstrap, seed=seed, metrics=list(METRICS))
            boot[seed] = {m: {"estimate": ci[m].estimate, "lo": ci[m].lo, "hi": ci[m].hi} for m in METRICS}
            for m in METRICS:
                per_seed[m].append(ci[m].estimate)
            if key == "teacher":
                teacher_auc[seed] = ci["auc"].estimate
        row = {"key": key, "label": label, "config": config, "model": model, "headline": headline}
        row.update({m: mean_ci(v) for m, v in per_seed.items()})
        row["per_seed"] = boot
        if key != "teacher" and boot and all(s in teacher_auc for s in boot):
            row["auc_minus_teacher"] = mean_ci([boot[s]["auc"]["estimate"] - teacher_auc[s] for s in boot])
        rows.append(row)
    walls = [
        json.loads(p.read_text())["wall_s"] for p in (out / "runs").glob("*/*/seed*/wall_seconds.json") if p.is_file()
    ]
    doc = {
        "schema": "fedslide.bench.multiclass_ablation/1",
        "setup": {
            "cohort": str(args.cohort),
            "folds": fold_names,
            "seeds": args.seeds,
            "classes": classes,
            "n_test_pooled": n_test,
            "bootstrap": args.bootstrap,
            "distill_set": args.distill_set,
            "configs": CONFIGS,
            "threads": args.threads,
            "encoder": args.encoder,
            "cpu_count": os.cpu_count(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        "rows": rows,
        "run_wall_s": {"runs": len(walls), "median": statistics.median(walls) if walls else math.nan},
    }
    (out / "multiclass_ablation.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    text = markdown(doc)
    (out / "multiclass_ablation.md").write_text(text)
    print(text)
    return doc


def markdown(doc: dict[str, Any]) -> str:
    s = doc["setup"]
    lines = [
        f"Leave-one-site-out ({', '.join(s['folds'])} held out in turn), {s['n_test_pooled']} held-out slides pooled, "
        f"classes {s['classes']}, seeds {s['seeds']}; AUC is macro one-vs-rest. Mean over seeds [95 % t-interval]:",
        "",
        "| row | AUC | balanced acc. | Brier | AUC − teacher (paired) |",
        "|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        diff = fmt_ci(r["auc_minus_teacher"]) if "auc_minus_teacher" in r else "—"
        lines.append(
            f"| {r['label']} | {fmt_ci(r['auc'])} | {fmt_ci(r['balanced_acc'])} | {fmt_ci(r['brier'])} | {diff} |"
        )
    lines += [
        "",
        f"Per seed: the pooled metric [95 % stratified bootstrap interval, {s['bootstrap']} resamples]:",
        "",
        "| row | seed | AUC | balanced acc. | Brier |",
        "|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        for seed, v in r["per_seed"].items():
            cells = " | ".join(f"{fmt(v[m]['estimate'])} [{fmt(v[m]['lo'])}, {fmt(v[m]['hi'])}]" for m in METRICS)
            lines.append(f"| {r['label']} | {seed} | {cells} |")
    w = doc["run_wall_s"]
    median = fmt(w["median"], 0) if finite(w["median"]) else "n/a"
    lines += ["", f"distill runs: {w['runs']}, median wall time {median} s each.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, required=True, help="preprocessed cohort root with site*/ (read only)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--step", choices=["all", "views", "distill", "table"], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", nargs="+", default=None, help="held-out sites to run (default: all)")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encoder", default=ENCODER, help="features/<encoder> of the frozen 5x and 20x files")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE", help="extra distill --set")
    args = ap.parse_args(argv)
    args.cohort, out = args.cohort.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.step in ("all", "views"):
        make_views(cohort_sites(args.cohort), out)
    if args.step in ("all", "distill"):
        distill(out, args)
    if args.step in ("all", "table"):
        table(out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
