"""Match labels to feature files and check every file before anything is trained."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedslide.common.config.base import ConfigError
from fedslide.common.config.layout import FeatureLayoutConfig
from fedslide.common.feature_layouts import FeatureLocation, locate_folder, read_bag
from fedslide.common.features import COMPLETE_ATTR, FeatureFileError, read_feature_file
from fedslide.common.training.errors import FeatureDataError, MissingDataError
from fedslide.common.training.labels import LabelTable

log = logging.getLogger(__name__)

# Attributes that describe one slide rather than the encoder/resolution shared by the cohort.
_PER_SLIDE_ATTRS = frozenset({"slide_id", "slide_mpp", "level0_magnification", "num_patches", COMPLETE_ATTR})
_ENCODER_KEYS = ("encoder_name", "encoder_weights_hash")


@dataclass(frozen=True)
class Slide:
    """A labelled slide with a checked feature file."""

    slide_id: str
    label: int
    patient_id: str
    split: str | None
    path: Path
    num_instances: int


@dataclass
class Cohort:
    """The slides to train on, their class names and feature properties shared by all files."""

    slides: list[Slide]
    classes: tuple[str, ...]
    feature_dim: int
    has_coords: bool
    encoder_attrs: dict[str, Any]
    bags: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = field(default=None, repr=False)

    @property
    def label_map(self) -> dict[str, int]:
        """Class name -> class index."""
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def labels(self) -> np.ndarray:
        """Class index of each slide, in slide order."""
        return np.array([s.label for s in self.slides], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        """Patient id of each slide, in slide order."""
        return np.array([s.patient_id for s in self.slides], dtype=object)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Features [N, D] and coords [N, 2] (or None) of slide `index`."""
        slide = self.slides[index]
        if self.bags is not None:
            return self.bags[slide.slide_id]
        bag = read_feature_file(slide.path)
        if not np.isfinite(bag.features).all():
            raise FeatureDataError(f"{slide.path}: features contain NaN or Inf (file changed since it was checked?)")
        return bag.features, (bag.coords if self.has_coords else None)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _name_some(paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths)} files)" if len(paths) > limit else "")


def _match(features_dir: Path, table: LabelTable, allow_missing: bool, location: FeatureLocation) -> dict[str, Path]:
    """slide_id -> feature file for labelled slides; unmatched ids on either side fail or warn."""
    files = location.files("high")
    features_dir = location.folders["high"]
    labelled = [r.slide_id for r in table.rows]
    no_features = sorted(sid for sid in labelled if sid not in files)
    no_labels = sorted(set(files) - set(labelled))
    if not no_features and not no_labels:
        return {sid: files[sid] for sid in labelled}
    parts = []
    if no_features:
        parts.append(
            f"{len(no_features)} labelled slide(s) in {table.path} have no feature file "
            f"<slide_id>{location.suffix} in {features_dir}: {', '.join(no_features)}"
        )
    if no_labels:
        parts.append(
            f"{len(no_labels)} feature file(s) in {features_dir} have no row in {table.path}: {', '.join(no_labels)}"
        )
    message = "\n".join(parts)
    if not allow_missing:
        raise MissingDataError(message + "\n(pass --allow-missing to train on the slides present in both)")
    log.warning("%s\n(--allow-missing: these slides are left out)", message)
    return {sid: files[sid] for sid in labelled if sid in files}


def _shared_attrs(per_file: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Attributes equal in every file, except per-slide ones."""
    shared: dict[str, Any] | None = None
    for attrs in per_file.values():
        current = {k: _plain(v) for k, v in attrs.items() if k not in _PER_SLIDE_ATTRS}
        shared = current if shared is None else {k: v for k, v in shared.items() if current.get(k, object()) == v}
    return shared or {}


def load_cohort(
    features_dir: Path | str,
    table: LabelTable,
    allow_missing: bool = False,
    preload: bool = True,
    layout: FeatureLayoutConfig | None = None,
) -> Cohort:
    """Check every matched feature file (readable, non-empty, finite, one dim, one encoder) and keep the bags.

    `layout` says whose folder `features_dir` is (fedslide's flat folder by default, or CLAM's / TRIDENT's:
    `common.feature_layouts.locate_folder`). All problems are collected and raised together in one
    FeatureDataError naming the files.
    """
    if not Path(features_dir).is_dir():
        raise FeatureDataError(f"features directory {features_dir} does not exist")
    try:
        location = locate_folder(features_dir, layout or FeatureLayoutConfig())
    except ConfigError as exc:
        raise FeatureDataError(f"features directory {features_dir}: {exc}") from None
    features_dir = location.folders["high"]
    paths = _match(features_dir, table, allow_missing, location)
    if not paths:
        raise MissingDataError(f"no labelled slide of {table.path} has a feature file in {features_dir}")
    label_map = table.label_map
    problems: list[str] = []
    by_dim: dict[int, list[str]] = defaultdict(list)
    by_encoder: dict[tuple[str, ...], list[str]] = defaultdict(list)
    attrs: dict[str, dict[str, Any]] = {}
    bags: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    slides: list[Slide] = []
    without_coords: list[str] = []
    for row in table.rows:
        path = paths.get(row.slide_id)
        if path is None:
            continue
        try:
            bag = read_bag(path, location)
        except FeatureFileError as exc:
            problems.append(str(exc))
            continue
        if len(bag) == 0:
            problems.append(f"{path}: empty feature file (0 instances)")
            continue
        bad = int(np.count_nonzero(~np.isfinite(bag.features)))
        if bad:
            problems.append(f"{path}: {bad} NaN/Inf value(s) in 'features'")
            continue
        by_dim[int(bag.features.shape[1])].append(str(path))
        encoder = tuple(str(bag.attrs[k]) for k in _ENCODER_KEYS if bag.attrs.get(k))
        if encoder:
            by_encoder[encoder].append(str(path))
        if bag.coords is None:
            without_coords.append(str(path))
        attrs[row.slide_id] = bag.attrs
        if preload:
            bags[row.slide_id] = (bag.features, bag.coords)
        slides.append(
            Slide(
                slide_id=row.slide_id,
                label=label_map[row.label],
                patient_id=row.patient_id,
                split=row.split,
                path=path,
                num_instances=len(bag),
            )
        )
    if len(by_dim) > 1:
        groups = sorted(by_dim.items(), key=lambda kv: -len(kv[1]))
        problems.append(
            "feature dims differ between files: "
            + "; ".join(
                f"dim {dim} in {len(files)} file(s): {_name_some(files) if i == 0 else ', '.join(files)}"
                for i, (dim, files) in enumerate(groups)
            )
        )
    if len(by_encoder) > 1:
        groups_e = sorted(by_encoder.items(), key=lambda kv: -len(kv[1]))
        problems.append(
            "feature files come from different encoders: "
            + "; ".join(
                f"{'/'.join(enc)} in {len(files)} file(s): {_name_some(files) if i == 0 else ', '.join(files)}"
                for i, (enc, files) in enumerate(groups_e)
            )
        )
    if problems:
        raise FeatureDataError(
            f"{len(problems)} problem(s) with the feature files in {features_dir}:\n  " + "\n  ".join(problems)
        )
    has_coords = not without_coords
    if without_coords and len(without_coords) < len(slides):
        log.warning(
            "coords missing in %d of %d feature files (%s); training without coords",
            len(without_coords),
            len(slides),
            _name_some(without_coords),
        )
    if preload and not has_coords:
        bags = {sid: (f, None) for sid, (f, _) in bags.items()}
    return Cohort(
        slides=slides,
        classes=table.classes,
        feature_dim=next(iter(by_dim)),
        has_coords=has_coords,
        encoder_attrs=_shared_attrs(attrs),
        bags=bags if preload else None,
    )
