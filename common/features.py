"""The feature-file format: CLAM/TRIDENT-style h5 files, written atomically with a completeness marker.

A file holds `features` [N, D] (float32) and `coords` [N, 2] (int64, level-0 top-left x, y).
High-res files also hold `parent` [N] (index of the containing low-res patch) and `child` [N]
(row * ratio + col of the patch inside that parent, ratio = `child_grid` attribute); low-res files
of CNN encoders may hold `tokens` [N, G*G, D] (float16, the G×G grid pooled from the
encoder's feature map; token g = row*G + col matches the child at that row/col).
Metadata sits in attributes of the file root and, as TRIDENT does, of `coords`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fedslide.common.atomic import atomic_path

FORMAT_VERSION = 1
COMPLETE_ATTR = "fedslide_complete"
RESOLUTIONS = ("high", "low")
# the tissue and tiling settings a file was made with (JSON text of the kebab-case config sections)
TISSUE_ATTR = "preprocess_tissue"
TILING_ATTR = "preprocess_tiling"
# JSON of the stain normaliser's identity the pixels were encoded with (`{"method": "none"}` when off or absent)
STAIN_ATTR = "stain_normalization"
NO_STAIN: dict[str, Any] = {"method": "none"}


class FeatureFileError(ValueError):
    """A feature file is missing, unreadable or does not follow the format."""


@dataclass(frozen=True)
class FeatureMeta:
    """What a feature file says about where its features came from."""

    slide_id: str
    resolution: str
    encoder_name: str
    encoder_weights_hash: str
    encoder_dim: int
    patch_size: int
    patch_size_level0: int
    target_mpp: float
    target_magnification: float
    slide_mpp: float
    level0_magnification: float
    config_hash: str = ""
    token_grid: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def attrs(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out.update(self.extra)
        out["format_version"] = FORMAT_VERSION
        return out


@dataclass
class FeatureBag:
    """The contents of one feature file."""

    path: Path
    features: np.ndarray
    coords: np.ndarray | None
    attrs: dict[str, Any]
    parent: np.ndarray | None = None
    child: np.ndarray | None = None
    tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


def feature_path(site_dir: Path | str, encoder: str, resolution: str, slide_id: str) -> Path:
    """`<site>/features/<encoder>/<resolution>/<slide_id>.h5`."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    return Path(site_dir) / "features" / encoder / resolution / f"{slide_id}.h5"


def config_hash(payload: dict[str, Any]) -> str:
    """Short stable hash of the settings that decide a file's contents."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def preprocess_attrs(tissue: dict[str, Any], tiling: dict[str, Any]) -> dict[str, str]:
    """The attributes that record a file's tissue and tiling settings (kebab-case dicts, as `to_toml_dict`)."""
    return {TISSUE_ATTR: json.dumps(tissue, sort_keys=True), TILING_ATTR: json.dumps(tiling, sort_keys=True)}


def recorded_preprocess(attrs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(tissue, tiling) settings recorded in a file's attributes; None when it records none (older files)."""
    if TISSUE_ATTR not in attrs or TILING_ATTR not in attrs:
        return None
    try:
        tissue, tiling = json.loads(attrs[TISSUE_ATTR]), json.loads(attrs[TILING_ATTR])
    except (TypeError, ValueError) as exc:
        raise FeatureFileError(f"attributes {TISSUE_ATTR}/{TILING_ATTR} are not JSON objects: {exc}") from exc
    if not isinstance(tissue, dict) or not isinstance(tiling, dict):
        raise FeatureFileError(f"attributes {TISSUE_ATTR}/{TILING_ATTR} are not JSON objects")
    return tissue, tiling


def stain_identity(attrs: Mapping[str, Any], where: Path | str = "feature file") -> dict[str, Any]:
    """The stain normalisation a file's attributes record (`NO_STAIN` when they record none: older files)."""
    text = attrs.get(STAIN_ATTR)
    if text in (None, ""):
        return dict(NO_STAIN)
    try:
        identity = json.loads(text) if isinstance(text, str) else text
    except ValueError as exc:
        raise FeatureFileError(f"{where}: attribute {STAIN_ATTR} = {text!r} is not JSON ({exc})") from exc
    if not isinstance(identity, dict) or "method" not in identity:
        raise FeatureFileError(f"{where}: attribute {STAIN_ATTR} = {text!r} is not an object with a 'method'")
    return dict(identity)


def shared_stain_identity(files: Iterable[tuple[Path | str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The one stain identity that every (path, attrs) records; refuses a mix, naming a file of each identity."""
    found: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for path, attrs in files:
        identity = stain_identity(attrs, path)
        key = json.dumps(identity, sort_keys=True)
        found.setdefault(key, (identity, []))[1].append(str(path))
    if not found:
        return dict(NO_STAIN)
    if len(found) > 1:
        parts = [
            f"{ident['method']} in {paths[0]}" + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else "")
            for ident, paths in found.values()
        ]
        raise FeatureFileError(
            f"feature files disagree on {STAIN_ATTR}: {'; '.join(parts)}; low- and high-res features must be "
            "encoded with the same stain normalisation (rerun `fedslide preprocess --overwrite` with one "
            "[preprocess] stain-normalize / stain-reference)"
        )
    return next(iter(found.values()))[0]


class FeatureWriter:
    """Streams one feature file to a temp file beside `path` and renames it into place only when finished.

    Use as a context manager: leaving the block with an exception deletes the temp file,
    so a crash never leaves a half-written file under the final name.
    """

    def __init__(self, path: Path | str, meta: FeatureMeta, with_parent: bool = False, with_tokens: bool = False):
        self.path = Path(path)
        self.meta = meta
        self.with_parent = with_parent
        self.with_tokens = with_tokens and meta.token_grid > 0
        self._file: h5py.File | None = None
        self._stack: ExitStack | None = None
        self._n = 0

    def __enter__(self) -> "FeatureWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            self._file = f = stack.enter_context(h5py.File(tmp, "w"))
            self._start(f)
            self._stack = stack.pop_all()
        return self

    def _start(self, f: h5py.File) -> None:
        """The empty datasets and the attributes, marked incomplete."""
        d = self.meta.encoder_dim
        f.create_dataset("features", shape=(0, d), maxshape=(None, d), dtype="float32", chunks=(256, d))
        f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(4096, 2))
        if self.with_parent:
            for name in ("parent", "child"):
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype="int64", chunks=(4096,))
        if self.with_tokens:
            g2 = self.meta.token_grid**2
            f.create_dataset("tokens", shape=(0, g2, d), maxshape=(None, g2, d), dtype="float16", chunks=(16, g2, d))
        for key, value in self.meta.attrs().items():
            f.attrs[key] = value
            f["coords"].attrs[key] = value
        f.attrs[COMPLETE_ATTR] = False

    def append(
        self,
        features: np.ndarray,
        coords: np.ndarray,
        parent: np.ndarray | None = None,
        child: np.ndarray | None = None,
        tokens: np.ndarray | None = None,
    ) -> None:
        """Add a block of patches (rows in the same order in every array)."""
        assert self._file is not None, "use FeatureWriter as a context manager"
        n = len(features)
        if n == 0:
            return
        if features.shape[1] != self.meta.encoder_dim:
            raise FeatureFileError(
                f"{self.path}: features have dim {features.shape[1]}, expected {self.meta.encoder_dim}"
            )
        if len(coords) != n or (
            self.with_parent and (parent is None or child is None or len(parent) != n or len(child) != n)
        ):
            raise FeatureFileError(f"{self.path}: features, coords, parent and child must have the same length")
        if self.with_tokens and (tokens is None or len(tokens) != n):
            raise FeatureFileError(f"{self.path}: tokens missing or of the wrong length")
        f = self._file
        start, stop = self._n, self._n + n
        blocks = [("features", features.astype(np.float32)), ("coords", coords.astype(np.int64))]
        if self.with_parent:
            blocks.append(("parent", np.asarray(parent, dtype=np.int64)))
            blocks.append(("child", np.asarray(child, dtype=np.int64)))
        if self.with_tokens:
            blocks.append(("tokens", np.asarray(tokens, dtype=np.float16)))
        for name, block in blocks:
            f[name].resize(stop, axis=0)
            f[name][start:stop] = block
        self._n = stop

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None and self._stack is not None
        if exc_type is None:
            self._file.attrs["num_patches"] = self._n
            self._file.attrs[COMPLETE_ATTR] = True
        stack, self._file, self._stack = self._stack, None, None
        stack.__exit__(exc_type, exc, tb)  # closes the file, then renames it into place or deletes it


def is_complete(path: Path | str, expected_config_hash: str | None = None) -> bool:
    """True when the file was finished by FeatureWriter (and, if given, with the same settings)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if not bool(f.attrs.get(COMPLETE_ATTR, False)):
                return False
            n = int(f.attrs.get("num_patches", -1))
            if f["features"].shape[0] != n or f["coords"].shape[0] != n:
                return False
            if "parent" in f and f["parent"].shape[0] != n:
                return False
            if expected_config_hash is not None and f.attrs.get("config_hash", "") != expected_config_hash:
                return False
    except (OSError, KeyError):
        return False
    return True


def _attr_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _read_pt(path: Path) -> FeatureBag:
    """A CLAM/TRIDENT `.pt` file: one tensor of features [N, D] (or [1, N, D]); no coords, no attributes."""
    import torch

    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a tensor pickle
        raise FeatureFileError(f"{path}: not a readable .pt feature file ({type(exc).__name__}: {exc})") from None
    if isinstance(value, dict) and "features" in value:
        value = value["features"]
    if not isinstance(value, torch.Tensor):
        raise FeatureFileError(f"{path}: a .pt feature file must hold a tensor [N, D], got {type(value).__name__}")
    features = value.detach().float().numpy()
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise FeatureFileError(f"{path}: the tensor must be [N, D], got shape {tuple(features.shape)}")
    return FeatureBag(path=path, features=np.ascontiguousarray(features), coords=None, attrs={})


def read_feature_file(path: Path | str, load_tokens: bool = False) -> FeatureBag:
    """Read a feature file made by fedslide, CLAM or TRIDENT: an h5 file (`coords` optional) or a `.pt` tensor."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"feature file {path} does not exist")
    if path.suffix == ".pt":
        return _read_pt(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise FeatureFileError(f"{path}: no 'features' dataset (keys: {sorted(f.keys())})")
            features = np.asarray(f["features"][()], dtype=np.float32)
            if features.ndim == 3 and features.shape[0] == 1:
                features = features[0]
            if features.ndim != 2:
                raise FeatureFileError(f"{path}: 'features' must be [N, D], got shape {features.shape}")
            coords = np.asarray(f["coords"][()], dtype=np.int64) if "coords" in f else None
            if coords is not None and coords.ndim == 3 and coords.shape[0] == 1:
                coords = coords[0]
            if coords is not None and coords.shape != (features.shape[0], 2):
                raise FeatureFileError(f"{path}: 'coords' must be [{features.shape[0]}, 2], got {coords.shape}")
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
            if "coords" in f:  # CLAM/TRIDENT keep their attributes on `coords`; read only what the file lacks
                coord_attrs = f["coords"].attrs
                for k in [k for k in coord_attrs if k not in attrs]:
                    attrs[k] = _attr_value(coord_attrs[k])
            parent = np.asarray(f["parent"][()], dtype=np.int64) if "parent" in f else None
            child = np.asarray(f["child"][()], dtype=np.int64) if "child" in f else None
            tokens = np.asarray(f["tokens"][()], dtype=np.float32) if load_tokens and "tokens" in f else None
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable h5 file ({exc})") from exc
    return FeatureBag(
        path=path, features=features, coords=coords, attrs=attrs, parent=parent, child=child, tokens=tokens
    )
