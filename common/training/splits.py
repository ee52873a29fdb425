"""Train/val/test splits: given in the CSV, carved once for a site without them (`<site>/splits.csv`), or
patient-grouped stratified k-fold repeated over seeds."""

from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedslide.common.atomic import atomic_write
from fedslide.common.training.errors import SplitError
from fedslide.common.training.labels import SPLIT_NAMES, LabelTable, read_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldSplit:
    """Slide indices (into the cohort) of one fold of one repeat; `seed` seeds its model and batches."""

    repeat: int
    fold: int
    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def name(self) -> str:
        """`repeat <r> fold <k>` for messages."""
        return f"repeat {self.repeat} fold {self.fold}"


def fold_seed(seed: int, repeat: int, fold: int) -> int:
    """Seed of one fold's model init and batch order."""
    return seed + 1000 * repeat + fold


def _stratified_group_folds(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """StratifiedGroupKFold splits, refusing fewer patients than folds."""
    from sklearn.model_selection import (
        StratifiedGroupKFold,  # lazy: a ClientApp process per message need not import it
    )

    n_groups = len(set(groups.tolist()))
    if n_groups < n_splits:
        raise SplitError(f"{n_groups} patient(s) cannot be split into {n_splits} patient-disjoint folds")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only k members": checked per fold by check_splits.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(splitter.split(np.zeros(len(labels)), labels, groups))


def inner_folds(
    pool: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) cohort indices of `folds` patient-grouped stratified folds of the slides `pool` (the
    inner CV of a refit: only the outer fold's training slides are split)."""
    pool = np.asarray(pool, dtype=np.int64)
    try:
        parts = _stratified_group_folds(labels[pool], groups[pool], folds, seed)
    except SplitError as exc:
        raise SplitError(f"cannot split the training slides into {folds} inner folds (refit): {exc}") from None
    return [(np.sort(pool[train]), np.sort(pool[held])) for train, held in parts]


def carve_validation(
    train: np.ndarray, labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into (train, val) by patient, stratified, val ≈ `val_fraction`."""
    n_splits = max(2, round(1.0 / val_fraction))
    try:
        inner = _stratified_group_folds(labels[train], groups[train], n_splits, seed)
    except SplitError as exc:
        raise SplitError(
            f"cannot carve a validation split ({val_fraction:g}) from the training slides: {exc}"
        ) from None
    keep, held = inner[0]
    return np.sort(train[keep]), np.sort(train[held])


def cv_splits(
    labels: np.ndarray, groups: np.ndarray, folds: int, repeats: int, seed: int, val_fraction: float
) -> list[FoldSplit]:
    """`repeats` × `folds` patient-grouped stratified splits; repeat r shuffles with seed + r."""
    out = []
    for repeat in range(repeats):
        for fold, (train, test) in enumerate(_stratified_group_folds(labels, groups, folds, seed + repeat)):
            train, val = carve_validation(train, labels, groups, val_fraction, seed + repeat)
            out.append(FoldSplit(repeat, fold, fold_seed(seed, repeat, fold), train, val, np.sort(test)))
    return out


def given_splits(
    split_names: Sequence[str | None],
    labels: np.ndarray,
    groups: np.ndarray,
    repeats: int,
    seed: int,
    val_fraction: float,
) -> list[FoldSplit]:
    """The CSV's train/val/test split, once per repeat (new seeds); val is carved from train when absent."""
    names = np.array([s or "" for s in split_names], dtype=object)
    train = np.flatnonzero(names == "train")
    val = np.flatnonzero(names == "val")
    test = np.flatnonzero(names == "test")
    if train.size == 0:
        raise SplitError("the labels CSV's split column has no 'train' slides")
    sets = {"train": set(groups[train].tolist()), "val": set(groups[val].tolist()), "test": set(groups[test].tolist())}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(sets[a] & sets[b])
        if shared:
            log.warning("given splits share patient(s) between %s and %s: %s", a, b, ", ".join(map(str, shared)))
    out = []
    for repeat in range(repeats):
        tr, va = (train, val) if val.size else carve_validation(train, labels, groups, val_fraction, seed + repeat)
        out.append(FoldSplit(repeat, 0, fold_seed(seed, repeat, 0), tr, va, test))
    return out


def check_splits(
    splits: Sequence[FoldSplit],
    labels: np.ndarray,
    classes: Sequence[str],
    slide_ids: Sequence[str],
    val_needs_all_classes: bool,
) -> None:
    """Refuse splits a model cannot be trained or early-stopped on, naming fold, split and classes."""
    problems = []
    all_classes = set(range(len(classes)))
    for split in splits:
        present = set(labels[split.train].tolist())
        if len(present) < 2:
            only = ", ".join(classes[c] for c in sorted(present)) or "none"
            ids = ", ".join(slide_ids[i] for i in split.train)
            problems.append(f"{split.name}: the training split has a single class ({only}); slides: {ids}")
        elif present != all_classes:
            absent = ", ".join(classes[c] for c in sorted(all_classes - present))
            problems.append(f"{split.name}: no training slides of class(es) {absent}")
        if split.test.size and len(set(labels[split.test].tolist())) < 2:
            log.warning(
                "%s: the test split has a single class; its AUC is undefined (left out of the mean)", split.name
            )
        if split.val.size == 0:
            problems.append(f"{split.name}: the validation split is empty")
        elif val_needs_all_classes and len(set(labels[split.val].tolist())) < 2:
            ids = ", ".join(slide_ids[i] for i in split.val)
            problems.append(
                f"{split.name}: the validation split has a single class, so its AUC is undefined "
                f'(use early-stopping-metric = "loss"); slides: {ids}'
            )
    if problems:
        raise SplitError("unusable split(s):\n  " + "\n  ".join(problems))


# ---- one site's split when its labels.csv has none: carved once, kept in <site>/splits.csv ---------------------
SPLITS_FILE = "splits.csv"
_SPLITS_HEADER = ["slide_id", "label", "patient_id", "split"]


def _holdout(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """About `fraction` of `idx` (whole patients), stratified by class; sorted indices into the cohort."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

    y, g = labels[idx], groups[idx]
    n_classes = len(set(y.tolist()))
    if len(set(g.tolist())) == len(g):  # one slide per patient: an exact stratified share
        n_hold = min(max(n_classes, round(fraction * len(idx))), len(idx) - n_classes)
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_hold, random_state=seed)
        _, held = next(splitter.split(np.zeros(len(idx)), y))
        return np.sort(idx[held])
    fewest = min(len(set(g[y == c].tolist())) for c in set(y.tolist()))  # patients of the rarest class
    n_splits = max(2, min(round(1.0 / fraction), fewest))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, held = next(splitter.split(np.zeros(len(idx)), y, g))
    return np.sort(idx[held])


def carve_splits(
    slide_ids: Sequence[str],
    labels: Sequence[str],
    patients: Sequence[str],
    classes: Sequence[str],
    test_fraction: float,
    val_fraction: float,
    seed: int,
    where: str,
) -> dict[str, str]:
    """slide_id -> "train" | "val" | "test": a stratified test split (none when `test_fraction` is 0), then a
    validation split from the rest, both by whole patients; refuses (naming `where`) when a split would lack a class."""
    fix = "add slides of that class, give labels.csv a split column (train/val/test)" + (
        ", or set carve.test-fraction = 0 for no test split" if test_fraction > 0 else ""
    )
    y = np.array([classes.index(c) for c in labels], dtype=np.int64)
    groups = np.array(patients, dtype=object)
    needed = 3 if test_fraction > 0 else 2
    short = []
    for k, name in enumerate(classes):
        n = len(set(groups[y == k].tolist()))
        if 0 < n < needed:
            short.append(f"class {name!r} has {n} patient(s)")
    if short:
        parts = "train, val and test" if needed == 3 else "train and val"
        raise SplitError(
            f"{where}: too few slides per class to carve splits: {'; '.join(short)} (each class needs at "
            f"least {needed}: one patient each for {parts}); {fix}"
        )
    everyone = np.arange(len(y))
    try:
        test = _holdout(everyone, y, groups, test_fraction, seed) if test_fraction > 0 else everyone[:0]
        rest = np.setdiff1d(everyone, test)
        val = _holdout(rest, y, groups, val_fraction, seed)
    except ValueError as exc:  # scikit-learn: a split too small for the classes
        raise SplitError(
            f"{where}: cannot carve splits with test-fraction {test_fraction:g}, val-fraction "
            f"{val_fraction:g}: {exc}; {fix}"
        ) from None
    out = {sid: "train" for sid in slide_ids}
    out.update({slide_ids[i]: "test" for i in test})
    out.update({slide_ids[i]: "val" for i in val})
    present = set(y.tolist())
    for split in ([] if test_fraction == 0 else ["test"]) + ["val", "train"]:
        have = {int(y[i]) for i, sid in enumerate(slide_ids) if out[sid] == split}
        absent = [classes[k] for k in sorted(present - have)]
        if absent:
            raise SplitError(
                f"{where}: the carved {split} split has no slide of class(es) {', '.join(map(repr, absent))}"
                f" (test-fraction {test_fraction:g}, val-fraction {val_fraction:g}, seed {seed}); raise "
                f"carve.{'test' if split == 'test' else 'val'}-fraction, {fix}"
            )
    return out


def split_counts(splits: dict[str, str], labels: dict[str, str], classes: Sequence[str]) -> str:
    """'train 7 (neg 4, pos 3), val 2 (...), test 3 (...)' of a split assignment."""
    parts = []
    for split in SPLIT_NAMES:
        members = [sid for sid, s in splits.items() if s == split]
        per_class = ", ".join(f"{c} {sum(labels[sid] == c for sid in members)}" for c in classes)
        parts.append(f"{split} {len(members)} ({per_class})")
    return ", ".join(parts)


def _read_splits_file(path: Path) -> dict[str, tuple[str, str]]:
    """slide_id -> (label, split) of a splits.csv."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("slide_id", "label", "split") if c not in (reader.fieldnames or [])]
        if missing:
            raise SplitError(
                f"{path}: missing column(s) {', '.join(missing)}; delete the file to carve the splits again"
            )
        rows = {row["slide_id"]: (row["label"], row["split"]) for row in reader}
    bad = sorted({s for _, s in rows.values()} - set(SPLIT_NAMES))
    if bad:
        raise SplitError(f"{path}: unknown split name(s) {bad}; allowed: {', '.join(SPLIT_NAMES)}")
    return rows


def _write_splits_file(path: Path, table: LabelTable, splits: dict[str, str]) -> None:
    """Write splits.csv atomically."""
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(_SPLITS_HEADER)
        writer.writerows([r.slide_id, r.label, r.patient_id, splits[r.slide_id]] for r in table.rows)


def site_splits(
    site_dir: Path, table: LabelTable, test_fraction: float, val_fraction: float, seed: int, name: str | None = None
) -> dict[str, str] | None:
    """slide_id -> split of a site whose labels have no split column (None when they have one): read from
    `<site>/splits.csv`, else carved (`carve_splits`), printed and written there for every later run."""
    if table.has_split:
        return None
    name = name or site_dir.name
    path = site_dir / SPLITS_FILE
    labels = {r.slide_id: r.label for r in table.rows}
    if path.is_file():
        saved = _read_splits_file(path)
        added = sorted(set(labels) - set(saved))
        removed = sorted(set(saved) - set(labels))
        relabelled = sorted(sid for sid in set(labels) & set(saved) if saved[sid][0] != labels[sid])
        has_test = any(s == "test" for _, s in saved.values())
        problems = [
            f"{len(v)} slide(s) {what}"
            for v, what in (
                (added, f"in {table.path} but not in it"),
                (removed, f"in it but not in {table.path}"),
                (relabelled, "with another label now"),
            )
            if v
        ]  # counts only: the message may leave the site
        if has_test != (test_fraction > 0):
            problems.append(
                f"it has {'a' if has_test else 'no'} test split but carve.test-fraction = {test_fraction:g}"
            )
        if problems:
            raise SplitError(
                f"site {name}: {path} no longer fits: {'; '.join(problems)}; delete it to carve the splits "
                "again (or give labels.csv a split column)"
            )
        splits = {sid: saved[sid][1] for sid in labels}
        log.debug("site %s: splits from %s: %s", name, path, split_counts(splits, labels, table.classes))
        return splits
    where = f"site {name} ({table.path}, no split column)"
    splits = carve_splits(
        [r.slide_id for r in table.rows],
        [r.label for r in table.rows],
        [r.patient_id for r in table.rows],
        table.classes,
        test_fraction,
        val_fraction,
        seed,
        where,
    )
    _write_splits_file(path, table, splits)
    log.info(
        "site %s: %s has no split column: carved %s by %s (test-fraction %g, val-fraction %g, seed %d): %s; "
        "written to %s (later runs reuse it; delete it to carve again)",
        name,
        table.path,
        "train/val/test" if test_fraction > 0 else "train/val",
        "patient" if table.has_patient else "slide",
        test_fraction,
        val_fraction,
        seed,
        split_counts(splits, labels, table.classes),
        path,
    )
    return splits


def recorded_splits(site_dir: Path) -> dict[str, str]:
    """slide_id -> split of a site as recorded: its labels.csv split column, else its carved `splits.csv`, else {}."""
    table = read_labels(site_dir / "labels.csv")
    if table.has_split:
        return {r.slide_id: r.split or "" for r in table.rows}
    path = site_dir / SPLITS_FILE
    return {sid: split for sid, (_, split) in _read_splits_file(path).items()} if path.is_file() else {}
