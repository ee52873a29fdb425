"""Missing clinical modality: bidirectional distillation (BD) against slide-only and filled multi-modal baselines.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_clinical_bd.py --out OUT [--seeds 5] [--mode federated]

Cohort (feature level, for speed; regenerated per seed): 3 sites whose training patients have clinical data
missing for 0 %, 50 % and 100 % of them. Each slide is a bag of 24-48 instances of D = 32 features ~ N(0, 1) plus
a per-site offset; on a tumour slide a share (uniform 3-15 %) of the instances is shifted along one fixed
direction, so the slides carry a real but partial signal (slide-only AUC about 0.8). The clinical table of each
site is written by `client/synth/clinical.py` (age, tumour size, grade with partial signal, ER status without)
and read back through `common.clinical.load_clinical` with the default schema.

Models: slide-only (BD's single-modal branch trained alone: gated ABMIL ⊕ prompt), one multi-modal branch with
missing vectors zero-filled (raw zeros) or mean-filled (the pooled mean), and BD (`common.models.bimodal`); all
trained `--mode federated` (FedAvg in process, `common.training.bidirectional.federate`, normalisation from the
sites' suppressed sums) or `--mode centralised` (pooled training slides). Each is scored on the pooled test
slides (3 sites × --test slides) with the clinical vectors of 0 / 50 / 80 / 100 % of them removed (the same
slides for every model).

Validation (`--val`, default 0.2): a label-stratified share of each site's training slides (each slide its own
patient here) is held out; every model kind is restored to the epoch (centralised, pooled validation AUC) or round
(federated, the sites' validation AUCs averaged by their slide counts) with the best validation AUC, read the way
inference reads (BD: multi-modal branch where clinical data is present); `--window K` selects on the mean of K
consecutive steps (the federated evidence uses 3) and `--patience` stops early. The test slides never enter
selection.

Reported per cell: mean test AUC over seeds with a 95 % t-interval, and for BD the paired difference to each
baseline (mean, 95 % t-interval over seeds). Writes OUT/clinical_bd.json and OUT/clinical_bd.md. The BD
settings (`--set weight-m2s=...`, `--window`, `--rounds`) were looked at on seeds 100-102 only (`--first-seed 100
--seeds 3`); the reported figures use seeds 0-4. Results: tests/bench/clinical_bd.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from fedslide.client.synth.clinical import write_clinical
from fedslide.common.clinical import load_clinical
from fedslide.common.config.base import load_config
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.metrics import roc_auc
from fedslide.common.training.bidirectional import (
    MODEL_KINDS,
    ClinicalBags,
    TrainSettings,
    build,
    centralised_stats,
    federate,
    predict,
    train,
    train_selected,
    validation_split,
)

TRAIN_MISSINGNESS = (0.0, 0.5, 1.0)
TEST_MISSINGNESS = (0.0, 0.5, 0.8, 1.0)
D = 32


def make_site(
    site: int, n: int, missingness: float, rng: np.random.Generator, direction: np.ndarray, folder: Path, split: str
) -> ClinicalBags:
    """One site's split: feature bags with partial signal and its clinical table written and read back."""
    labels = rng.permutation(np.arange(n) % 2)
    offset = rng.normal(0.0, 0.3, size=D)
    bags = []
    for y in labels:
        size = int(rng.integers(24, 49))
        x = rng.normal(size=(size, D)) + offset
        if y == 1:
            hit = rng.random(size) < rng.uniform(0.03, 0.15)
            x[hit] += direction
        bags.append(x.astype(np.float32))
    ids = [f"site{site}_{split}{i:03d}" for i in range(n)]
    path = folder / f"site{site}_{split}_clinical.csv"
    write_clinical(path, ids, labels.tolist(), missingness, rng, key="slide_id")
    raw = load_clinical(path, ClinicalConfig()).lookup(ids)
    return ClinicalBags.from_lists(bags, labels.tolist(), raw)


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % t half-width."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(sps.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))


def pool(sets: list[ClinicalBags]) -> ClinicalBags:
    """The sites' slides as one set."""
    return ClinicalBags.from_lists(
        [b[m].numpy() for t in sets for b, m in zip(t.features, t.mask)],
        [int(y) for t in sets for y in t.labels],
        np.concatenate([t.raw for t in sets]),
    )


def run_seed(seed: int, args: argparse.Namespace, cfg: ClinicalConfig, folder: Path) -> dict[str, dict[str, float]]:
    """Test AUC of every model at every test missingness for one seed (and, with a validation split, the selected
    epoch or round under key "selected")."""
    rng = np.random.default_rng([seed, 34])
    direction = np.zeros(D)
    direction[: args.signal_dims] = args.signal / math.sqrt(args.signal_dims)
    train_sets = [
        make_site(s + 1, args.train, m, rng, direction, folder, "train") for s, m in enumerate(TRAIN_MISSINGNESS)
    ]
    val_sets: list[ClinicalBags] | None = None
    if args.val > 0:
        splits = [validation_split(bags, args.val, seed * 10 + i) for i, bags in enumerate(train_sets)]
        train_sets, val_sets = [t for t, _ in splits], [v for _, v in splits]
    tests = [make_site(s + 1, args.test, 0.0, rng, direction, folder, "test") for s in range(len(TRAIN_MISSINGNESS))]
    test = pool(tests)
    hidden = {m: test.hide_clinical(m, np.random.default_rng([seed, 35, int(m * 100)])) for m in TEST_MISSINGNESS}
    settings = TrainSettings(epochs=args.local_epochs if args.mode == "federated" else args.epochs)
    out: dict[str, dict[str, float]] = {}
    for kind in args.kinds:
        if args.mode == "federated":
            result = federate(
                kind,
                train_sets,
                cfg,
                args.rounds,
                settings,
                seed,
                min_slides=args.min_slides,
                val_sets=val_sets,
                patience=args.patience,
                window=args.window,
            )
            model, norm, selected = result.model, result.stats, result.best_round
        else:
            norm = centralised_stats(train_sets)
            pooled = pool(train_sets)
            torch.manual_seed(seed)
            if val_sets is None:
                model, selected = train(build(kind, D, cfg), kind, pooled, norm, cfg, settings, seed), None
            else:
                chosen = train_selected(
                    build(kind, D, cfg),
                    kind,
                    pooled,
                    pool(val_sets),
                    norm,
                    cfg,
                    settings,
                    seed,
                    args.patience,
                    args.window,
                )
                model, selected = chosen.model, chosen.best
        labels = test.labels.numpy()
        out[kind] = {f"{m:g}": roc_auc(labels, predict(model, kind, hidden[m], norm)) for m in TEST_MISSINGNESS}
        if selected is not None:
            out[kind]["selected"] = float(selected + 1)
        print(f"seed {seed} {kind:10s} " + " ".join(f"{k}:{v:.3f}" for k, v in out[kind].items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--mode", choices=("federated", "centralised"), default="federated")
    parser.add_argument("--train", type=int, default=80, help="training slides per site")
    parser.add_argument("--test", type=int, default=40, help="test slides per site")
    parser.add_argument(
        "--val", type=float, default=0.2, help="share of each site's training slides held out for validation (0: none)"
    )
    parser.add_argument(
        "--patience", type=int, default=None, help="early stopping: epochs (rounds) without validation gain"
    )
    parser.add_argument(
        "--window", type=int, default=1, help="select on the mean validation AUC of this many consecutive steps"
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60, help="centralised epochs")
    parser.add_argument("--signal", type=float, default=2.5, help="norm of the tumour instances' shift")
    parser.add_argument("--signal-dims", type=int, default=4)
    parser.add_argument("--min-slides", type=int, default=5, help="suppress-below of the clinical sums")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--kinds", nargs="+", choices=MODEL_KINDS, default=list(MODEL_KINDS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="ClinicalConfig KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(ClinicalConfig, overrides=args.overrides)
    start = time.perf_counter()
    per_seed: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            per_seed.append(run_seed(seed, args, cfg, Path(tmp)))
    cols = [f"{m:g}" for m in TEST_MISSINGNESS]
    kinds = [kind for kind in MODEL_KINDS if kind in args.kinds]
    table = {kind: {col: t_interval([s[kind][col] for s in per_seed]) for col in cols} for kind in kinds}
    diffs = {
        base: {col: t_interval([s["bd"][col] - s[base][col] for s in per_seed]) for col in cols}
        for base in kinds
        if base != "bd" and "bd" in kinds
    }
    lines = [
        f"# Missing clinical modality ({args.mode}, {args.seeds} seeds, {3 * args.test} test slides)",
        "",
        "Test AUC, mean ± 95 % t half-width over seeds; columns: share of test slides without clinical data.",
        "",
        "| model | " + " | ".join(f"{float(c) * 100:.0f} % missing" for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in table[kind].values()) + " |")
    lines += ["", "BD minus baseline (paired over seeds, mean ± 95 % t half-width):", ""]
    lines += [
        "| baseline | " + " | ".join(f"{float(c) * 100:.0f} %" for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for base, row in diffs.items():
        lines.append(f"| {base} | " + " | ".join(f"{m:+.3f} ± {h:.3f}" for m, h in row.values()) + " |")
    picked = {kind: [s[kind]["selected"] for s in per_seed if "selected" in s[kind]] for kind in kinds}
    if any(picked.values()):
        step = "round" if args.mode == "federated" else "epoch"
        lines += ["", f"Selected {step} on validation AUC (per seed): "]
        lines[-1] += "; ".join(f"{kind} {', '.join(f'{v:.0f}' for v in picked[kind])}" for kind in kinds)
    seconds = time.perf_counter() - start
    lines += ["", f"{seconds:.0f} s on {platform.machine()} ({platform.python_version()}), torch threads 1."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clinical_bd.md").write_text("\n".join(lines) + "\n")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "clinical_bd.json").write_text(
        json.dumps({"settings": settings, "per_seed": per_seed, "table": table, "diffs": diffs}, indent=2) + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
