"""Train/val/test splits: given in the CSV, or patient-grouped stratified k-fold repeated over seeds."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedslide.common.training.errors import SplitError

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
    from sklearn.model_selection import StratifiedGroupKFold  # lazy: a ClientApp process per message need not import it

    n_groups = len(set(groups.tolist()))
    if n_groups < n_splits:
        raise SplitError(f"{n_groups} patient(s) cannot be split into {n_splits} patient-disjoint folds")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only k members": checked per fold by check_splits.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(splitter.split(np.zeros(len(labels)), labels, groups))


def carve_validation(
    train: np.ndarray, labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into (train, val) by patient, stratified, val ≈ `val_fraction`."""
    n_splits = max(2, round(1.0 / val_fraction))
    try:
        inner = _stratified_group_folds(labels[train], groups[train], n_splits, seed)
    except SplitError as exc:
        raise SplitError(f"cannot carve a validation split ({val_fraction:g}) from the training slides: {exc}") from None
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
            log.warning("%s: the test split has a single class; its AUC is undefined (left out of the mean)", split.name)
        if split.val.size == 0:
            problems.append(f"{split.name}: the validation split is empty")
        elif val_needs_all_classes and len(set(labels[split.val].tolist())) < 2:
            ids = ", ".join(slide_ids[i] for i in split.val)
            problems.append(
                f"{split.name}: the validation split has a single class, so its AUC is undefined "
                f"(use early-stopping-metric = \"loss\"); slides: {ids}"
            )
    if problems:
        raise SplitError("unusable split(s):\n  " + "\n  ".join(problems))
