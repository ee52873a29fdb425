"""VIB-fine-tuned encoder on a whole cohort (issue 34): teacher AND LRMIL student vs the frozen encoder.

    python tests/bench/bench_vib_cohort.py --cohort /tmp/H48 --out /tmp/vib48 \
        [--frozen-runs /tmp/h4abl/runs/frozen] [--seeds 0 1 2] [--step all] [--threads 1] [--zoom-k 2] [--zoom-threshold 0.5]

Run on demand (not collected by pytest); every step is resumable (finished outputs are reused). Centralised:

1. views: OUT/views/<site>/ links the site's slides and frozen features and holds a labels.csv whose split is
   carved exactly as `bench_lowres_ablation.py` carves it (stratified, seed 0, `--test-fraction` test, 20 % of the
   rest val), so the test slides are the ones of its frozen rows. OUT/pool/ links every site's train and val
   slides (and their frozen feature files) with a labels.csv of those rows: the pooled training site.
2. finetune: one `fedslide finetune OUT/pool --method vib --no-reencode` with the settings in VIB_SET (fixed before
   any test result was seen), weights in OUT/vib/; it trains on the pool's train split only (val and test slides'
   pixels and labels are never seen).
3. reencode: `fedslide finetune VIEW --method vib` with the same settings on every view (training is skipped: same
   settings hash), which re-encodes both levels of all its slides with the pooled weights.
4. distill: `fedslide distill --sites OUT/views/* --set encoder=<the VIB feature folder>` per seed (default distill
   config otherwise), outputs in OUT/runs/seed<S>/metrics.json.
5. table: OUT/vib_cohort.json and .md: teacher, labels-only baseline and LRMIL student (+ D&D) on the VIB features,
   next to the same models of the frozen runs (`--frozen-runs`, e.g. the low-res ablation's) on the same test
   slides: mean and 95 % t-interval over seeds, paired (same seed) VIB - frozen and student - teacher.
6. zoom: `fedslide predict` end to end from the slide files of the test slides, per seed, with the LRMIL student
   bundle (`lrmil_student`) and the VIB weights (`--weights OUT/vib/<encoder>.pt`: the bundle records their hash
   but holds no encoder.pt), once with `--zoom K` and once with `--zoom-threshold T` (the teacher on the 20x
   children of the selected 5x regions), run and summarised exactly as `bench_lowres_ablation.py`'s predict step
   and zoom rows do for its frozen rows (its `run_predict` and `zoom_rows`); also the student alone from the same
   runs, next to its distill metrics. Outputs OUT/predict/<row>_seed<S>/, OUT/vib_zoom.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from bench_distill import fedslide
from bench_distill import run_logged as run_command
from bench_lowres_ablation import carve, distill_cmd, fmt_ci, mean_ci

ENCODER = "efficientnet_lite0"
# Stage settings, fixed before any test result: the product's (= reference code's) defaults except bag-size 16
# (the patch budget of the recorded site-1 run; the hard cohort's slides hold 65-97 20x patches, so the default 512
# would select every patch), lr 1e-4 (the site-1 run's; 1e-5 barely moves the encoder in one epoch) and one epoch
# (3 epochs over the pooled slides extrapolate from the site-1 run to ~40-55 min on the shared CPU).
VIB_SET = ["bag-size=16", "lr=1e-4", "encoder.num-workers=0"]
VIB_EPOCHS = 1
# row key -> (label, model name in metrics.json)
MODELS: dict[str, tuple[str, str]] = {
    "teacher": ("teacher (20×)", "teacher_high"),
    "baseline": ("labels-only low-res baseline (5×)", "baseline_low"),
    "student": ("LRMIL student (frozen adapter, default)", "lrmil_student"),
    "student_dd": ("LRMIL + D&D student", "lrmil_dd_student"),
}
METRICS = ("auc", "balanced_acc", "brier")


def run_logged(cmd: list[str], log_path: Path, threads: int) -> float:
    """`bench_distill.run_logged`, its wall seconds also recorded in the log folder's seconds.json; exits on
    failure, naming the log."""
    rc, seconds = run_command(cmd, log_path, threads)
    record = log_path.parent / "seconds.json"
    done = json.loads(record.read_text()) if record.is_file() else {}
    record.write_text(json.dumps({**done, log_path.stem: round(seconds, 1)}, indent=1) + "\n")
    if rc != 0:
        raise SystemExit(f"{cmd[3]} failed (exit {rc}); see {log_path}")
    return seconds


# ---------------------------------------------------------------- 1. views and the pooled training site


def write_labels(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "label", "split"])
        w.writeheader()
        w.writerows(rows)


def link(dest: Path, target: Path) -> None:
    if not dest.is_symlink():
        dest.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def make_views(sites: list[Path], out: Path, test_fraction: float) -> None:
    """OUT/views/<site>/ (links + carved labels.csv) and OUT/pool/ (train and val slides of every site)."""
    from fedslide.client.slides import discover_slides
    from fedslide.common.config.preprocess import SlideConfig

    pool_rows: list[dict[str, str]] = []
    for sub in ("slides", f"features/{ENCODER}/high", f"features/{ENCODER}/low"):
        (out / "pool" / sub).mkdir(parents=True, exist_ok=True)
    for site in sites:
        rows = carve(site, test_fraction)
        view = out / "views" / site.name
        (view / "features").mkdir(parents=True, exist_ok=True)
        link(view / "slides", site / "slides")
        link(view / "features" / ENCODER, site / "features" / ENCODER)
        write_labels(view / "labels.csv", rows)
        files = {p.stem: p for p in discover_slides(site / "slides", SlideConfig().extensions)}
        for row in rows:
            if row["split"] == "test":
                continue
            pool_rows.append(row)
            link(out / "pool" / "slides" / files[row["slide_id"]].name, files[row["slide_id"]])
            for res in ("high", "low"):
                src = site / "features" / ENCODER / res / f"{row['slide_id']}.h5"
                link(out / "pool" / "features" / ENCODER / res / src.name, src)
        print(f"{site.name}: {sum(r['split'] == 'test' for r in rows)} test of {len(rows)} slides", flush=True)
    write_labels(out / "pool" / "labels.csv", pool_rows)


def view_sites(out: Path) -> list[Path]:
    return sorted((out / "views").glob("site*"))


# ---------------------------------------------------------------- 2-4. fine-tune, re-encode, distill


def vib_flags(out: Path, threads: int) -> list[str]:
    sets = [*VIB_SET, f"encoder.threads={threads}", f"output={out / 'vib'}"]
    return ["--method", "vib", "--epochs", str(VIB_EPOCHS), "--no-progress", *[x for s in sets for x in ("--set", s)]]


def vib_folder(view: Path) -> str:
    """The feature folder the VIB re-encoding wrote in `view` (any features/ subfolder but the frozen one)."""
    found = sorted(
        p.name for p in (view / "features").iterdir() if p.is_dir() and p.name != ENCODER and (p / "high").is_dir()
    )
    if len(found) != 1:
        raise SystemExit(f"{view / 'features'}: expected one VIB feature folder besides {ENCODER}, found {found}")
    return found[0]


def weights_hash(out: Path) -> str:
    return str(json.loads((out / "vib" / f"{ENCODER}.json").read_text())["weights_hash"])


def finetune(out: Path, threads: int) -> None:
    """Fine-tune once on the pool, then re-encode every view with those weights (refusing to go on if a view's run
    fine-tuned again instead of reusing them, e.g. because the settings hash changed)."""
    if not (out / "vib" / f"{ENCODER}.json").is_file():
        run_logged(
            fedslide("finetune", str(out / "pool"), "--no-reencode", *vib_flags(out, threads)),
            out / "logs" / "finetune.log",
            threads,
        )
    pooled = weights_hash(out)
    shutil.copy2(out / "vib" / f"{ENCODER}.json", out / "vib" / "pool_manifest.json")
    for view in view_sites(out):
        log = out / "logs" / f"reencode_{view.name}.log"
        run_logged(fedslide("finetune", str(view), *vib_flags(out, threads)), log, threads)
        if weights_hash(out) != pooled or "reused" not in log.read_text():
            raise SystemExit(f"{view}: `fedslide finetune` did not reuse the pooled weights {pooled[:12]}; see {log}")


def distill(out: Path, seeds: list[int], threads: int) -> None:
    views = view_sites(out)
    folder = vib_folder(views[0])
    for seed in seeds:
        dest = out / "runs" / f"seed{seed}"
        if (dest / "metrics.json").is_file():
            continue
        cmd = distill_cmd(views, dest, seed, threads, [f"encoder={folder}"])
        run_logged(cmd, out / "logs" / f"distill_seed{seed}.log", threads)


# ---------------------------------------------------------------- 5. table


def test_row(metrics: dict[str, Any], model: str) -> dict[str, Any] | None:
    return next((r for r in metrics["rows"] if r["model"] == model and r.get("split", "test") == "test"), None)


def per_seed(runs: Path, seeds: list[int], model: str) -> dict[str, list[float]]:
    """Test metric per seed of `model` in RUNS/seed<S>/metrics.json (NaN where missing)."""
    out: dict[str, list[float]] = {k: [] for k in METRICS}
    for seed in seeds:
        p = runs / f"seed{seed}" / "metrics.json"
        row = test_row(json.loads(p.read_text()), model) if p.is_file() else None
        for k in METRICS:
            value = row.get(k) if row else None
            out[k].append(float(value) if isinstance(value, (int, float)) else math.nan)
    return out


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean and t-interval of the per-seed differences a - b."""
    return mean_ci([x - y for x, y in zip(a, b)])


def build_table(vib_runs: Path, frozen_runs: Path, seeds: list[int]) -> dict[str, Any]:
    """Rows per (encoder arm, model) with metric summaries and the paired differences."""
    arms = {"frozen": frozen_runs, "vib": vib_runs}
    values = {
        (arm, key): per_seed(runs, seeds, model) for arm, runs in arms.items() for key, (_, model) in MODELS.items()
    }
    rows = []
    for key, (label, model) in MODELS.items():
        for arm in arms:
            v = values[(arm, key)]
            row: dict[str, Any] = {"arm": arm, "key": key, "label": label, "model": model}
            row.update({k: mean_ci(v[k]) for k in METRICS})
            row["auc_minus_teacher"] = None if key == "teacher" else paired(v["auc"], values[(arm, "teacher")]["auc"])
            row["vib_minus_frozen_auc"] = paired(v["auc"], values[("frozen", key)]["auc"]) if arm == "vib" else None
            rows.append(row)
    return {"seeds": seeds, "vib_runs": str(vib_runs), "frozen_runs": str(frozen_runs), "rows": rows}


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"Test split: {doc['n_test']} slides {doc['test_class_counts']}, seeds {doc['seeds']}; mean [95 % t-interval "
        "over seeds]; metrics from `fedslide distill` metrics.json (feature files). Frozen rows: "
        f"`{doc['frozen_runs']}`; VIB rows: `{doc['vib_runs']}`.",
        "",
        "| encoder | model | AUC | balanced acc. | Brier | AUC − teacher (paired) | VIB − frozen AUC (paired) "
        "| per-seed AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        per = " / ".join("n/a" if not math.isfinite(x) else f"{x:.3f}" for x in r["auc"]["values"])
        lines.append(
            f"| {r['arm']} | {r['label']} | {fmt_ci(r['auc'])} | {fmt_ci(r['balanced_acc'])} | {fmt_ci(r['brier'])} "
            f"| {fmt_ci(r['auc_minus_teacher']) if r['auc_minus_teacher'] else '—'} "
            f"| {fmt_ci(r['vib_minus_frozen_auc']) if r['vib_minus_frozen_auc'] else '—'} | {per} |"
        )
    ft = doc.get("finetune")
    if ft:
        lines += [
            "",
            f"VIB fine-tune (centralised, on the pooled training-split slides of every site; val and test held out): "
            f"{ft['slides']} slides, "
            f"{ft['selected']} of {ft['instances']} 20× instances selected, {ft['patches_forward_backward']} patch "
            f"forward + backward passes, {ft['trainable_params']:,} trainable parameters, {ft['seconds']:.0f} s, "
            f"loss per epoch {[round(h['loss'], 4) for h in ft['history']]}, weights sha256 {ft['weights_hash'][:12]}; "
            f"settings `{' '.join(doc['vib_set'])}`, epochs {doc['vib_epochs']}.",
        ]
    if doc.get("seconds"):
        lines += ["", "Wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in doc["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def table(out: Path, frozen_runs: Path, seeds: list[int]) -> dict[str, Any]:
    doc = build_table(out / "runs", frozen_runs, seeds)
    labels = {}
    for view in view_sites(out):
        with (view / "labels.csv").open(newline="") as fh:
            labels.update({r["slide_id"]: r["label"] for r in csv.DictReader(fh) if r["split"] == "test"})
    y = list(labels.values())
    doc.update(n_test=len(y), test_class_counts={c: y.count(c) for c in sorted(set(y))})
    doc.update(vib_set=VIB_SET, vib_epochs=VIB_EPOCHS)
    manifest = out / "vib" / "pool_manifest.json"
    if manifest.is_file():
        doc["finetune"] = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "settings"}
    record = out / "logs" / "seconds.json"
    doc["seconds"] = json.loads(record.read_text()) if record.is_file() else {}
    (out / "vib_cohort.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "vib_cohort.md").write_text(markdown(doc))
    print(markdown(doc))
    return doc


# ---------------------------------------------------------------- 6. zoom from the slide files

# zoom row key -> (label, predict options); {k} / {t} are --zoom-k / --zoom-threshold
ZOOM_ROWS: dict[str, tuple[str, list[str]]] = {
    "zoom": ("VIB LRMIL student + zoom top-{k}", ["--zoom", "{k}"]),
    "zoomthr": ("VIB LRMIL student + zoom relevance > {t}", ["--zoom-threshold", "{t}"]),
}
ZOOM_BUNDLE = "lrmil_student"


def test_labels(out: Path) -> dict[str, str]:
    """slide_id -> label of every view's test split."""
    labels: dict[str, str] = {}
    for view in view_sites(out):
        with (view / "labels.csv").open(newline="") as fh:
            labels.update({r["slide_id"]: r["label"] for r in csv.DictReader(fh) if r["split"] == "test"})
    return labels


def zoom_predict(out: Path, seeds: list[int], threads: int, k: int, t: float) -> None:
    """The zoom rows' `fedslide predict` runs (finished ones are reused)."""
    from bench_lowres_ablation import link_slides, run_predict

    slides = link_slides(out, "test_slides", sorted(test_labels(out)), view_sites(out))
    weights = ["--weights", str(out / "vib" / f"{ENCODER}.pt")]
    for key, (_, options) in ZOOM_ROWS.items():
        opts = [o.format(k=k, t=t) for o in options]
        for seed in seeds:
            bundle = out / "runs" / f"seed{seed}" / ZOOM_BUNDLE
            run_predict(out, f"{key}_seed{seed}", bundle, slides, opts + weights, threads)


def zoom_table(out: Path, seeds: list[int], k: int, t: float) -> dict[str, Any]:
    """OUT/vib_zoom.json and .md: per zoom row the student from the slides and the zoom metrics (mean and 95 %
    t-interval over the seeds whose predict run finished), 20x patches encoded and cost saved, and the student's
    distill (feature-file) AUC per seed for comparison."""
    from bench_lowres_ablation import zoom_rows

    labels = test_labels(out)
    classes = sorted(set(labels.values()))
    rows = {}
    for key, (label, _) in ZOOM_ROWS.items():
        done = [s for s in seeds if (out / "predict" / f"{key}_seed{s}" / "predictions.csv").is_file()]
        summary = zoom_rows(out, argparse.Namespace(seeds=done), labels, classes, key)
        rows[key] = {"label": label.format(k=k, t=t), "seeds": done, **summary}
    distill_auc = per_seed(out / "runs", seeds, MODELS["student"][1])["auc"]
    doc = {"n_test": len(labels), "seeds": seeds, "zoom_k": k, "zoom_threshold": t, "rows": rows}
    doc["student_distill_auc"] = dict(zip(map(str, seeds), distill_auc))
    (out / "vib_zoom.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    md = zoom_markdown(doc)
    (out / "vib_zoom.md").write_text(md)
    print(md)
    return doc


def zoom_markdown(doc: dict[str, Any]) -> str:
    def per(s: dict[str, Any]) -> str:
        return " / ".join("n/a" if not math.isfinite(x) else f"{x:.3f}" for x in s["values"])

    lines = [
        f"Zoom from the slide files ({doc['n_test']} test slides; the teacher on the 20× children of the selected 5× "
        "regions, the student's own label where none is selected); mean [95 % t-interval over seeds].",
        "",
        "| zoom row | seeds | student AUC (from the slides) | per-seed | + zoom AUC | + zoom balanced acc. "
        "| + zoom Brier | per-seed zoom AUC | 5× patches / slide | 20× patches encoded / slide | high-res cost saved "
        "| slides without a zoom label |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"].values():
        st, z = r["student_from_slides"], r["zoom"]
        lines.append(
            f"| {r['label']} | {', '.join(map(str, r['seeds']))} | {fmt_ci(st['auc'])} | {per(st['auc'])} "
            f"| {fmt_ci(z['auc'])} | {fmt_ci(z['balanced_acc'])} | {fmt_ci(z['brier'])} | {per(z['auc'])} "
            f"| {r['low_patches_mean']:.1f} | {r['zoom_high_patches_mean']:.1f} | {r['high_cost_saved']:.3f} "
            f"| {r['fallback_to_student']} |"
        )
    d = doc["student_distill_auc"]
    lines += [
        "",
        "Student AUC from `fedslide distill` (feature files), per seed: "
        + ", ".join(f"seed {s} {v:.3f}" for s, v in d.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--frozen-runs", type=Path, default=Path("/tmp/h4abl/runs/frozen"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step", choices=["all", "views", "finetune", "distill", "table", "zoom"], default="all")
    ap.add_argument("--zoom-k", type=int, default=2)
    ap.add_argument("--zoom-threshold", type=float, default=0.5, help="AHDMIL's pre-screen threshold (not tuned)")
    args = ap.parse_args(argv)
    sites = sorted(p for p in args.cohort.glob("site*") if (p / "labels.csv").is_file())
    if not sites:
        raise SystemExit(f"{args.cohort}: no site*/labels.csv")
    if args.step in ("all", "views"):
        if (args.out / "pool").exists() and args.step == "all":
            print("views exist: reused", flush=True)
        else:
            make_views(sites, args.out, args.test_fraction)
    if args.step in ("all", "finetune"):
        finetune(args.out, args.threads)
    if args.step in ("all", "distill"):
        distill(args.out, args.seeds, args.threads)
    if args.step in ("all", "table"):
        table(args.out, args.frozen_runs, args.seeds)
    if args.step in ("all", "zoom"):
        zoom_predict(args.out, args.seeds, args.threads, args.zoom_k, args.zoom_threshold)
        zoom_table(args.out, args.seeds, args.zoom_k, args.zoom_threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
