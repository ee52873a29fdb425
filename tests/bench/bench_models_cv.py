"""Every MIL model of the zoo, 5-fold patient-grouped CV, at high and low resolution: the table in docs/benchmarks.md.

Run::

    python tests/bench/bench_models_cv.py --sites COHORT/site1 COHORT/site2 COHORT/site3 --out OUT \
        [--models abmil transmil ...] [--resolutions high low] [--epochs 30] [--patience 8] \
        [--folds 5] [--seed 0] [--threads 1] [--encoder efficientnet_lite0]

Each site is a `fedslide synth` + `fedslide preprocess` directory: `labels.csv` (slide_id,label,split,patient_id)
and `features/<encoder>/<resolution>/<slide_id>.h5`. For each resolution the sites are pooled into a temporary
directory of symlinks plus one merged labels CSV without the split column (slide_id,label,patient_id), so
`fedslide train` (splits = "auto") runs patient-grouped stratified k-fold CV. Every model in
`common.models.MODEL_NAMES` is trained with `run_training` on that pool with the same seed and schedule; the
reported AUC and accuracy are each fold's held-out test split, mean ± sd (ddof 1) over folds; "train s" is the
wall time of the whole CV run (all folds, including evaluation). A model that fails gets its error in its row
and the table goes on.

Writes OUT/models_cv.json (all rows, settings, per-fold numbers), OUT/models_cv.md (the table) and each run's
trainer outputs under OUT/runs/<resolution>/<model>/ (metrics.json, predictions.csv, history.csv, model.pt).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import tempfile
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", nargs="+", required=True, type=Path, help="site directories (synth + preprocess)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--models", nargs="+", default=None, help="model names (default: every registered model)")
    parser.add_argument("--resolutions", nargs="+", default=["high", "low"], help="feature resolutions")
    parser.add_argument("--encoder", default=None, help="features/<encoder> sub-directory (default: the only one)")
    parser.add_argument("--epochs", type=int, default=30, help="maximum epochs per fold")
    parser.add_argument("--patience", type=int, default=8, help="early-stopping patience (epochs, on val loss)")
    parser.add_argument("--folds", type=int, default=5, help="CV folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits, init and batch order")
    parser.add_argument("--threads", type=int, default=1, help="torch (and BLAS) threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:i], auto")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="any [train] setting (TOML)"
    )
    return parser.parse_args(argv)


def _encoder_dir(site: Path, encoder: str | None) -> Path:
    root = site / "features"
    if encoder:
        return root / encoder
    found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(found) != 1:
        raise SystemExit(
            f"{root}: expected exactly one encoder directory, found {[p.name for p in found]}; pass --encoder"
        )
    return found[0]


def pool_sites(sites: list[Path], resolution: str, encoder: str | None, dest: Path) -> dict[str, Any]:
    """Symlink every site's `<resolution>` feature files into dest/features and write dest/labels.csv.

    The merged CSV has slide_id,label,patient_id (no split column, so the trainer runs k-fold CV).
    Patient ids that occur in more than one site are prefixed with the site's directory name.
    """
    features = dest / "features"
    features.mkdir(parents=True)
    rows: list[tuple[str, str, str, str]] = []  # site, slide_id, label, patient_id
    for site in sites:
        feat_dir = _encoder_dir(site, encoder) / resolution
        with (site / "labels.csv").open(newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                sid = row["slide_id"].strip()
                patient = (row.get("patient_id") or "").strip() or sid
                src = feat_dir / f"{sid}.h5"
                if not src.is_file():
                    raise SystemExit(f"{src}: no feature file for labelled slide {sid} (is preprocessing finished?)")
                link = features / f"{sid}.h5"
                if link.exists():
                    raise SystemExit(f"slide id {sid} occurs in more than one site")
                link.symlink_to(src.resolve())
                rows.append((site.name, sid, row["label"].strip(), patient))
    sites_of: dict[str, set[str]] = {}
    for site, _, _, patient in rows:
        sites_of.setdefault(patient, set()).add(site)
    shared = {p for p, s in sites_of.items() if len(s) > 1}
    labels = dest / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label", "patient_id"])
        for site, sid, label, patient in rows:
            writer.writerow([sid, label, f"{site}/{patient}" if patient in shared else patient])
    counts: dict[str, int] = {}
    for _, _, label, _ in rows:
        counts[label] = counts.get(label, 0) + 1
    return {
        "features_dir": features,
        "labels": labels,
        "slides": len(rows),
        "patients": len(sites_of),
        "classes": counts,
        "patient_ids_prefixed": sorted(shared),
    }


def _bag_sizes(features_dir: Path) -> dict[str, float]:
    from fedslide.common.features import read_feature_file

    sizes = [len(read_feature_file(p)) for p in sorted(features_dir.glob("*.h5"))]
    return {"min": min(sizes), "mean": sum(sizes) / len(sizes), "max": max(sizes)}


def _stat(summary: dict[str, Any], name: str) -> dict[str, float] | None:
    stats = summary.get(name)
    if not stats or not stats.get("n"):
        return None
    return {"mean": stats["mean"], "sd": stats["sd"], "n": stats["n"]}


def run_one(model: str, resolution: str, pool: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train `model` with k-fold CV on the pooled features; the row of the table (error recorded, not raised)."""
    from fedslide.common.config.model import ModelConfig
    from fedslide.common.config.train import TrainConfig
    from fedslide.common.training.run import run_training

    row: dict[str, Any] = {"model": model, "resolution": resolution}
    out_dir = args.out / "runs" / resolution / model
    start = time.perf_counter()
    try:
        cfg = TrainConfig(
            features_dir=pool["features_dir"],
            labels=pool["labels"],
            out_dir=out_dir,
            model=ModelConfig(name=model),
            splits="cv",
            cv_folds=args.folds,
            epochs=args.epochs,
            early_stopping_patience=args.patience,
            seed=args.seed,
            device=args.device,
            save_fold_checkpoints=False,
            **{
                k.strip().replace("-", "_"): tomllib.loads(f"v = {v}")["v"]
                for k, _, v in (pair.partition("=") for pair in args.overrides)
            },
        )
        report = run_training(cfg, progress=False)
    except Exception as exc:  # noqa: BLE001 - a failing model must not stop the table
        row["seconds"] = time.perf_counter() - start
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        row["traceback"] = traceback.format_exc()
        return row
    row["seconds"] = time.perf_counter() - start
    test = report.summary.get("test", {})
    row["auc"] = _stat(test, "auc")
    row["acc"] = _stat(test, "acc")
    row["loss"] = _stat(test, "loss")
    row["balanced_acc"] = _stat(test, "balanced_acc")
    row["val_auc"] = _stat(report.summary["val"], "auc")
    row["folds"] = [
        {
            "fold": f.split.fold,
            "n_train": int(f.split.train.size),
            "n_val": int(f.split.val.size),
            "n_test": int(f.split.test.size),
            "epochs_run": f.fit.epochs_run,
            "best_epoch": f.fit.best_epoch,
            "test_auc": None if f.test_metrics is None else _finite(f.test_metrics["auc"]),
            "test_acc": None if f.test_metrics is None else _finite(f.test_metrics["acc"]),
            "val_loss": _finite(f.val_metrics["loss"]),
        }
        for f in report.folds
    ]
    row["mean_epochs_run"] = sum(f["epochs_run"] for f in row["folds"]) / len(row["folds"])
    row["mean_best_epoch"] = sum(f["best_epoch"] for f in row["folds"]) / len(row["folds"])
    return row


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _pm(stats: dict[str, float] | None) -> str:
    if not stats or stats.get("mean") is None or not math.isfinite(stats["mean"]):
        return "n/a"
    sd = stats["sd"] if stats["sd"] is not None and math.isfinite(stats["sd"]) else float("nan")
    return f"{stats['mean']:.3f} ± {sd:.3f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table: one row per model, AUC / accuracy / train seconds per resolution."""
    resolutions = meta["resolutions"]
    by = {(r["model"], r["resolution"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    header = ["model"]
    for res in resolutions:
        header += [f"AUC ({res})", f"acc ({res})", f"train s ({res})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    notes = []
    for model in models:
        cells = [f"`{model}`"]
        for res in resolutions:
            row = by.get((model, res))
            if row is None:
                cells += ["", "", ""]
            elif "error" in row:
                first = row["error"].splitlines()[0]
                notes.append(f"- `{model}` ({res}) failed after {row['seconds']:.0f} s: {first}")
                cells += ["failed", "failed", f"{row['seconds']:.0f}"]
            else:
                cells += [_pm(row["auc"]), _pm(row["acc"]), f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    pools = meta["pools"]
    first = pools[resolutions[0]]
    sizes = ", ".join(
        f"{res} {pools[res]['bag_size']['mean']:.0f} (min {pools[res]['bag_size']['min']}, "
        f"max {pools[res]['bag_size']['max']})"
        for res in resolutions
        if res in pools
    )
    caption = (
        f"{meta['folds']}-fold patient-grouped stratified CV on {first['slides']} slides "
        f"({', '.join(f'{n} {c}' for c, n in sorted(first['classes'].items()))}; {first['patients']} patients) "
        f"pooled from {len(meta['sites'])} sites of `fedslide synth`, features from `fedslide preprocess` "
        f"({meta['encoder']}; instances per slide: {sizes}). AUC and accuracy on each fold's held-out test "
        f"slides, mean ± sd over folds; train s = wall time of the whole CV run (all folds) on {meta['device']} "
        f"with {meta['threads']} torch thread(s). Training defaults of `fedslide train` (AdamW, lr 2e-4, cosine, "
        f"batch 8, model defaults) except at most {meta['epochs']} epochs per fold with early stopping on "
        f"validation loss (patience {meta['patience']}), seed {meta['seed']}."
    )
    out = "\n".join(lines) + "\n\n" + caption + "\n"
    if notes:
        out += "\n" + "\n".join(notes) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass

    from fedslide.common.models import MODEL_NAMES

    models = args.models or list(MODEL_NAMES)
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; registered: {', '.join(MODEL_NAMES)}")
    sites = [s.resolve() for s in args.sites]
    args.out.mkdir(parents=True, exist_ok=True)
    encoder = _encoder_dir(sites[0], args.encoder).name
    meta: dict[str, Any] = {
        "sites": [str(s) for s in sites],
        "encoder": encoder,
        "resolutions": args.resolutions,
        "models": models,
        "folds": args.folds,
        "epochs": args.epochs,
        "patience": args.patience,
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "overrides": args.overrides,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "pools": {},
    }
    rows: list[dict[str, Any]] = []
    total_start = time.perf_counter()

    def save() -> None:
        meta["total_seconds"] = time.perf_counter() - total_start
        payload = {"meta": meta, "rows": rows}
        (args.out / "models_cv.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (args.out / "models_cv.md").write_text(markdown(rows, meta))

    with tempfile.TemporaryDirectory(prefix="bench_models_cv_") as tmp:
        pools = {}
        for res in args.resolutions:
            pool = pool_sites(sites, res, args.encoder, Path(tmp) / res)
            pool["bag_size"] = _bag_sizes(pool["features_dir"])
            pools[res] = pool
            meta["pools"][res] = {k: v for k, v in pool.items() if k not in ("features_dir", "labels")}
            print(
                f"[{res}] {pool['slides']} slides, {pool['patients']} patients, {pool['classes']}, "
                f"instances/slide {pool['bag_size']}",
                flush=True,
            )
        for res in args.resolutions:
            for model in models:
                row = run_one(model, res, pools[res], args)
                rows.append(row)
                if "error" in row:
                    print(f"[{res}] {model:<12} FAILED after {row['seconds']:.1f} s: {row['error']}", flush=True)
                else:
                    print(
                        f"[{res}] {model:<12} AUC {_pm(row['auc'])}  acc {_pm(row['acc'])}  "
                        f"{row['seconds']:.1f} s  epochs/fold {row['mean_epochs_run']:.1f} "
                        f"(best {row['mean_best_epoch']:.1f})",
                        flush=True,
                    )
                save()
    save()
    print(f"total {meta['total_seconds']:.1f} s -> {args.out / 'models_cv.md'}", flush=True)
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
