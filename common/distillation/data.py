"""Paired low/high feature files of several sites, checked and held in memory, with their splits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedslide.common.config.splits import SplitCarving
from fedslide.common.config.base import ConfigError
from fedslide.common.distillation.feature_folders import is_finetuned_features
from fedslide.common.feature_layouts import FeatureLocation, locate, pair_bags, read_bag, site_layout
from fedslide.common.feature_store import FeatureStore
from fedslide.common.features import FeatureBag, FeatureFileError, feature_path, read_feature_file
from fedslide.common.training.cohort import Cohort, Slide
from fedslide.common.training.errors import FeatureDataError, MissingDataError, SplitError
from fedslide.common.training.labels import LabelTable, class_order, read_labels
from fedslide.common.training.splits import carve_validation, site_splits

log = logging.getLogger(__name__)

_ENCODER_KEYS = ("encoder_name", "encoder_weights_hash", "encoder_dim")


@dataclass
class SlidePair:
    """One labelled slide with its low-res (features, coords, tokens) and high-res (features, parent, child) files."""

    key: str  # "<site>/<slide_id>": unique across sites
    site: str
    slide_id: str
    label: int
    patient_id: str
    split: str  # "train" | "val" | "test"
    low: FeatureBag
    high: FeatureBag

    @property
    def low_size_level0(self) -> float:
        """Level-0 side of a low patch (exact when the file says so)."""
        attrs = self.low.attrs
        return float(attrs.get("patch_size_level0_exact") or attrs.get("patch_size_level0") or 0.0)


@dataclass
class DistillData:
    """All slides of all sites, their classes and the encoder/resolution facts every file shares."""

    slides: list[SlidePair]
    classes: tuple[str, ...]
    feature_dim: int
    token_grid: int  # 0 when the low files carry no tokens
    child_grid: int
    low_attrs: dict[str, Any]
    high_attrs: dict[str, Any]
    encoder: str
    sites: list[str] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        """Class index per slide."""
        return np.array([s.label for s in self.slides], dtype=np.int64)

    def split(self, name: str) -> np.ndarray:
        """Indices of the slides in split `name`."""
        return np.array([i for i, s in enumerate(self.slides) if s.split == name], dtype=np.int64)

    @property
    def has_tokens(self) -> bool:
        """Every low file carries tokens."""
        return self.token_grid > 0

    def cohort(self, bags: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> Cohort:
        """A training Cohort over all slides (same order as `slides`) reading the given bags."""
        slides = [
            Slide(
                slide_id=s.key,
                label=s.label,
                patient_id=s.patient_id,
                split=s.split,
                path=s.low.path,
                num_instances=int(bags[s.key][0].shape[0]),
            )
            for s in self.slides
        ]
        dims = {int(b[0].shape[1]) for b in bags.values()}
        if len(dims) != 1:
            raise ValueError(f"bags have different dims {sorted(dims)}")
        has_coords = all(b[1] is not None for b in bags.values())
        return Cohort(
            slides=slides,
            classes=self.classes,
            feature_dim=dims.pop(),
            has_coords=has_coords,
            encoder_attrs=dict(self.low_attrs),
            bags=bags if has_coords else {k: (f, None) for k, (f, _) in bags.items()},
        )

    def high_bags(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """High-res bags (the teacher's and experts' input)."""
        return {s.key: (s.high.features, s.high.coords) for s in self.slides}

    def low_bags(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Raw low-res bags (the low-res baseline's input)."""
        return {s.key: (s.low.features, s.low.coords) for s in self.slides}


def _class_names(tables: list[LabelTable]) -> tuple[str, ...]:
    names = {c for t in tables for c in t.classes}
    first = tables[0].classes
    if all(set(t.classes) == set(first) for t in tables):
        return first
    return class_order(names)


def site_location(site_dir: Path) -> FeatureLocation | None:
    """The CLAM/TRIDENT folders a site declares in `<site>/features.toml` (None: fedslide's own layout).

    Raises FeatureDataError naming the site's file for a bad declaration."""
    try:
        cfg = site_layout(site_dir)
        return locate(site_dir, cfg) if cfg is not None else None
    except ConfigError as exc:
        raise FeatureDataError(f"site {site_dir}: features.toml: {exc}") from None


def detect_encoder(sites: list[Path]) -> str:
    """The one `features/<encoder>` folder every site has (fine-tuned encoders' folders, `<encoder>-ft-<hash12>`,
    `<encoder>-vib-<hash12>` or `*-finetuned`, do not count);
    a site with a CLAM/TRIDENT layout (`<site>/features.toml`) counts with its layout's encoder label."""
    per_site = []
    for s in sites:
        location = site_location(Path(s))
        if location is not None:
            per_site.append({location.encoder})
            continue
        per_site.append(
            {p.name for p in (Path(s) / "features").glob("*") if p.is_dir() and not is_finetuned_features(p.name)}
        )
    common = set.intersection(*per_site) if per_site else set()
    if len(common) == 1:
        return common.pop()
    listing = "; ".join(f"{s}: {', '.join(sorted(n)) or '(none)'}" for s, n in zip(sites, per_site))
    if not common:
        raise FeatureDataError(f"no features/<encoder> folder shared by all sites ({listing})")
    raise FeatureDataError(
        f"several encoders under features/ ({', '.join(sorted(common))}); set encoder = NAME ({listing})"
    )


def child_slots(low: FeatureBag, high: FeatureBag, grid: int) -> np.ndarray:
    """Slot (row * grid + col) of each high patch in its parent: the `child` dataset, else from coords."""
    if high.child is not None:
        return high.child
    if high.parent is None or high.coords is None or low.coords is None or grid <= 0:
        raise FeatureDataError(f"{high.path}: no 'child' dataset and no parent/coords to derive it")
    step = float(high.attrs.get("patch_size_level0_exact") or high.attrs.get("patch_size_level0") or 0)
    if step <= 0:
        raise FeatureDataError(f"{high.path}: no 'child' dataset and no patch_size_level0 to derive it")
    offset = (high.coords - low.coords[high.parent]) / step
    col, row = np.rint(offset[:, 0]).astype(np.int64), np.rint(offset[:, 1]).astype(np.int64)
    return row * grid + col


def _check_pair(low: FeatureBag, high: FeatureBag, grid: int) -> list[str]:
    problems = []
    if len(low) == 0 or len(high) == 0:
        problems.append(f"{low.path if len(low) == 0 else high.path}: empty feature file")
        return problems
    for bag in (low, high):
        if not np.isfinite(bag.features).all():
            problems.append(f"{bag.path}: NaN/Inf in 'features'")
    if high.parent is None:
        problems.append(f"{high.path}: no 'parent' dataset (high-res files must name each patch's low-res parent)")
    elif high.parent.min() < 0 or high.parent.max() >= len(low):
        problems.append(f"{high.path}: 'parent' indices outside 0..{len(low) - 1} of {low.path.name}")
    if low.tokens is not None and not np.isfinite(low.tokens).all():
        problems.append(f"{low.path}: NaN/Inf in 'tokens'")
    if high.features.shape[1] != low.features.shape[1]:
        problems.append(
            f"{high.path}: dim {high.features.shape[1]} differs from the low-res file's {low.features.shape[1]}"
        )
    return problems


def load_sites(
    sites: Sequence[Path | str],
    encoder: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    store: FeatureStore | None = None,
    carving: SplitCarving | None = None,
    low_features: str | None = None,
) -> DistillData:
    """Read `<site>/labels.csv` and every slide's low and high feature files; check them all first.

    Every problem (missing files, encoder mismatch between files or sites, bad parents) is
    collected into one FeatureDataError. A site whose labels.csv has no split column gets its test and
    validation splits from `<site>/splits.csv`, carved there first by `carving` (`training.splits.site_splits`;
    refused before anything is trained when a split would lack a class). A CSV with a split column but no val
    slides gets a validation split carved (by patient) from its training slides. `classes` fixes the class order
    (a federation's global list); by default it is made from the labels. A `store` serves the files it holds unchanged from memory.
    `low_features` names the `features/<name>/low` folder of the low-res files (e.g. `<encoder>-ft-<hash12>`,
    written by `fedslide finetune`); by default the high-res files' `encoder` folder. Its files must come from
    the same architecture; their weights hash is checked per resolution.
    """
    site_dirs = [Path(s) for s in sites]
    if not site_dirs:
        raise MissingDataError("no sites given (--sites DIR [DIR ...])")
    names = [d.name for d in site_dirs]
    if len(set(names)) != len(names):
        names = [f"{i}-{d.name}" for i, d in enumerate(site_dirs)]
    encoder = encoder or detect_encoder(site_dirs)
    tables = [read_labels(d / "labels.csv", classes) for d in site_dirs]  # names file/line of an unknown label
    carving = carving or SplitCarving()
    assigned = [
        site_splits(d, t, carving.test_fraction, carving.val_fraction, carving.seed, name)
        for d, t, name in zip(site_dirs, tables, names)
    ]
    classes = tuple(classes) if classes is not None else _class_names(tables)
    unknown = sorted({c for t in tables for c in t.classes} - set(classes))
    if unknown:
        raise MissingDataError(f"labels {unknown} are not among the classes {list(classes)}")
    label_map = {c: i for i, c in enumerate(classes)}
    read = read_feature_file if store is None else store.read
    problems: list[str] = []
    missing: list[str] = []
    slides: list[SlidePair] = []
    encoders: dict[tuple[str, ...], list[str]] = {}
    token_grids: set[int] = set()
    child_grids: set[int] = set()
    for site_dir, name, table, carved in zip(site_dirs, names, tables, assigned):
        location = site_location(site_dir)
        for row in table.rows:
            if location is not None:  # CLAM / TRIDENT folders: parent and child derived from the coords
                paths = {r: location.path(r, row.slide_id) for r in ("low", "high")}
            else:
                paths = {
                    "low": feature_path(site_dir, low_features or encoder, "low", row.slide_id),
                    "high": feature_path(site_dir, encoder, "high", row.slide_id),
                }
            absent = [str(p) for p in paths.values() if not p.is_file()]
            if absent:
                missing.extend(absent)
                continue
            try:
                if location is not None:
                    low, high = pair_bags(
                        read_bag(paths["low"], location, load_tokens=True), read_bag(paths["high"], location)
                    )
                else:
                    low = read(paths["low"], load_tokens=True)
                    high = read(paths["high"])
            except FeatureFileError as exc:
                problems.append(str(exc))
                continue
            pair_problems = _check_pair(low, high, int(low.attrs.get("child_grid") or 4))
            if pair_problems:
                problems.extend(pair_problems)
                continue
            for res, bag in (("low", low), ("high", high)):
                key = (res, *(str(bag.attrs.get(k, "")) for k in _ENCODER_KEYS))
                encoders.setdefault(key, []).append(str(bag.path))
            token_grids.add(int(round(np.sqrt(low.tokens.shape[1]))) if low.tokens is not None else 0)
            grid = int(low.attrs.get("child_grid") or high.attrs.get("child_grid") or 4)
            child_grids.add(grid)
            try:
                high.child = child_slots(low, high, grid)
            except FeatureDataError as exc:
                problems.append(str(exc))
                continue
            split = (carved or {}).get(row.slide_id) or row.split or "train"
            slides.append(
                SlidePair(
                    key=f"{name}/{row.slide_id}",
                    site=name,
                    slide_id=row.slide_id,
                    label=label_map[row.label],
                    patient_id=f"{name}/{row.patient_id}",
                    split=split,
                    low=low,
                    high=high,
                )
            )
    if missing:
        problems.insert(
            0,
            f"{len(missing)} labelled slide file(s) missing: "
            + ", ".join(missing[:10])
            + (f", ... ({len(missing)} files)" if len(missing) > 10 else ""),
        )
    by_resolution = {res: [k for k in encoders if k[0] == res] for res in ("low", "high")}
    if (
        any(len(keys) > 1 for keys in by_resolution.values())
        or len({(k[1], k[3]) for k in encoders}) > 1
        or (low_features is None and len({k[1:] for k in encoders}) > 1)
    ):
        problems.append(
            "feature files come from different encoders (resolution/name/weights/dim): "
            + "; ".join(f"{'/'.join(k)} in {len(v)} file(s), e.g. {v[0]}" for k, v in encoders.items())
        )
    if len(token_grids) > 1:
        problems.append(f"some low-res files carry tokens and some do not (token grids {sorted(token_grids)})")
    if len(child_grids) > 1:
        problems.append(f"child grids differ between files: {sorted(child_grids)}")
    if problems:
        raise FeatureDataError(f"{len(problems)} problem(s) with the feature files:\n  " + "\n  ".join(problems))
    if not slides:
        raise MissingDataError("no slide has both feature files")
    _ensure_validation(slides, val_fraction, seed)
    if not any(s.split == "test" for s in slides):
        if carving.test_fraction == 0 and not all(t.has_split for t in tables):
            log.info("no test split (carve.test-fraction = 0): test metrics will be empty (null)")
        else:
            log.warning("no test slides in the labels' split column: test metrics will be empty (null)")
    token_grid = token_grids.pop()
    child_grid = child_grids.pop()
    if token_grid and token_grid != child_grid:
        raise FeatureDataError(
            f"token grid {token_grid}×{token_grid} does not match the child grid {child_grid}×{child_grid}"
        )
    return DistillData(
        slides=slides,
        classes=classes,
        feature_dim=int(slides[0].low.features.shape[1]),
        token_grid=token_grid,
        child_grid=child_grid,
        low_attrs=_shared(s.low.attrs for s in slides),
        high_attrs=_shared(s.high.attrs for s in slides),
        encoder=encoder,
        sites=names,
    )


_PER_SLIDE = {
    "slide_id",
    "slide_mpp",
    "level0_magnification",
    "num_patches",
    "fedslide_complete",
    "patch_size_level0",
    "patch_size_level0_exact",
    "mpp_source",
    "slide_vendor",
}


def _shared(attrs_iter: Any) -> dict[str, Any]:
    shared: dict[str, Any] | None = None
    for attrs in attrs_iter:
        cur = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in attrs.items() if k not in _PER_SLIDE}
        shared = cur if shared is None else {k: v for k, v in shared.items() if cur.get(k, object()) == v}
    return shared or {}


def _ensure_validation(slides: list[SlidePair], val_fraction: float, seed: int) -> None:
    if any(s.split == "val" for s in slides):
        return
    train = np.array([i for i, s in enumerate(slides) if s.split == "train"], dtype=np.int64)
    if train.size == 0:
        raise SplitError("no training slides (labels.csv split column)")
    labels = np.array([s.label for s in slides])
    groups = np.array([s.patient_id for s in slides], dtype=object)
    try:
        _, val = carve_validation(train, labels, groups, val_fraction, seed)
    except (SplitError, ValueError):  # too few slides per class for the folds: one patient per class
        val = _one_patient_per_class(train, labels, groups, seed)
    log.info("no val slides in the labels: carved %d validation slide(s) from the training slides", len(val))
    for i in val:
        slides[int(i)].split = "val"


def _one_patient_per_class(train: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Validation slides of one random patient per class (each class keeps another patient for training)."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in np.unique(labels[train]):
        patients = sorted({groups[i] for i in train if labels[i] == label})
        if len(patients) < 2:
            raise SplitError(
                f"cannot carve a validation split: class {label} has {len(patients)} training patient(s); "
                "add split=val rows to labels.csv"
            )
        pick = patients[int(rng.integers(len(patients)))]
        chosen.extend(int(i) for i in train if groups[i] == pick)
    return np.array(sorted(chosen), dtype=np.int64)
