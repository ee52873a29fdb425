"""Feature files where CLAM or TRIDENT left them: finding them, reading them, pairing their two resolutions.

Layouts (config: `common.config.layout.FeatureLayoutConfig`):
- fedslide: `<site>/features/<encoder>/{high,low}/<slide_id>.h5` (see `common.features`).
- CLAM (`extract_features_fp.py`): `<feat_dir>/h5_files/<slide_id>.h5` holding `features` [N, D] and `coords`
  [N, 2] (level-0 top-left, no attributes) and `<feat_dir>/pt_files/<slide_id>.pt` holding the features tensor
  alone. CLAM runs once per magnification, so a site names one feature folder per resolution (`high`, `low`).
- TRIDENT: `<job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide_id>.h5` holding `features` and
  `coords`, with `patch_size`, `patch_size_level0`, `target_magnification`, `level0_magnification` and `overlap`
  as attributes of `coords` (the names fedslide uses too); `.pt` files hold the features alone.

Neither tool writes fedslide's `parent`/`child` datasets: `pair_bags` derives them from the coords (the low patch
whose square contains a high patch's centre; high patches outside every kept low patch are left out).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fedslide.common.atomic import atomic_path
from fedslide.common.config.base import ConfigError, load_config
from fedslide.common.config.layout import SITE_LAYOUT_FILE, FeatureLayoutConfig
from fedslide.common.features import RESOLUTIONS, FeatureBag, FeatureFileError, read_feature_file

log = logging.getLogger(__name__)

TRIDENT_DIR = re.compile(r"^(?P<mag>\d+(?:\.\d+)?)x_(?P<size>\d+)px_(?P<overlap>\d+)px_overlap$")
TRIDENT_FEATURES = "features_"
CLAM_DIRS = {"h5": "h5_files", "pt": "pt_files"}


@dataclass(frozen=True)
class FeatureLocation:
    """The resolved folder of each resolution of one layout, and the encoder label its files get."""

    layout: str
    encoder: str
    folders: dict[str, Path]  # resolution -> folder holding <slide_id><suffix>
    suffix: str = ".h5"

    def path(self, resolution: str, slide_id: str) -> Path:
        """Where the slide's file of that resolution is (it may not exist)."""
        return self.folders[resolution] / f"{slide_id}{self.suffix}"

    def files(self, resolution: str) -> dict[str, Path]:
        """slide_id -> file of every slide in the resolution's folder."""
        folder = self.folders[resolution]
        return {p.stem: p for p in sorted(folder.glob(f"*{self.suffix}")) if p.is_file()}


def site_layout(site_dir: Path | str) -> FeatureLayoutConfig | None:
    """The layout `<site>/features.toml` declares; None when the site has none (fedslide's own layout)."""
    path = Path(site_dir) / SITE_LAYOUT_FILE
    if not path.is_file():
        return None
    cfg = load_config(FeatureLayoutConfig, path=path)
    return None if cfg.layout == "fedslide" else cfg


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _missing(folder: Path, what: str, key: str) -> ConfigError:
    return ConfigError(f"{key}: {what} {folder} does not exist")


def _trident_magnification_dir(root: Path, name: str | None, magnification: float, key: str) -> Path:
    if name is not None:
        folder = root / name
        if not folder.is_dir():
            raise _missing(folder, "TRIDENT magnification folder", key)
        return folder
    found = [(p, TRIDENT_DIR.match(p.name)) for p in _subdirs(root)]
    listed = ", ".join(p.name for p, m in found if m) or "(none)"
    hits = [p for p, m in found if m and float(m["mag"]) == magnification]
    if len(hits) != 1:
        which = "no" if not hits else "several"
        raise ConfigError(
            f"{root}: {which} TRIDENT folder <mag>x_<size>px_<overlap>px_overlap at {magnification:g}x "
            f"(found: {listed}); set {key} to the folder's name"
        )
    return hits[0]


def _trident_features_dir(mag_dir: Path, encoder: str | None, key: str) -> Path:
    if encoder is not None:
        folder = mag_dir / f"{TRIDENT_FEATURES}{encoder}"
        if not folder.is_dir():
            raise _missing(folder, "TRIDENT features folder", key)
        return folder
    found = [p for p in _subdirs(mag_dir) if p.name.startswith(TRIDENT_FEATURES)]
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "(none)"
        raise ConfigError(
            f"{mag_dir}: {'no' if not found else 'several'} features_<encoder> folder(s) (found: {listed}); "
            f"set {key} to the encoder's name"
        )
    return found[0]


def _suffix(folder: Path) -> str:
    """.h5 unless the folder holds only .pt files (TRIDENT's `saveas = pt`)."""
    return ".pt" if not any(folder.glob("*.h5")) and any(folder.glob("*.pt")) else ".h5"


def locate(base: Path | str, cfg: FeatureLayoutConfig, resolutions: tuple[str, ...] = RESOLUTIONS) -> FeatureLocation:
    """Resolve the layout's folders for `resolutions` under `base` (a site folder; `cfg.root` is relative to it).

    Raises ConfigError naming the key, the folder and what was found there.
    """
    base = Path(base)
    root = base / cfg.root if cfg.root is not None else base
    if not root.is_dir():
        raise _missing(root, f"{cfg.layout} feature folder", "root")
    folders: dict[str, Path] = {}
    if cfg.layout == "fedslide":
        encoder = cfg.encoder or ""
        for res in resolutions:
            folders[res] = root / "features" / encoder / res
        return FeatureLocation("fedslide", encoder, folders)
    if cfg.layout == "clam":
        sub = CLAM_DIRS[cfg.clam_files]
        for res in resolutions:
            name = cfg.high if res == "high" else cfg.low
            if name is None:
                raise ConfigError(
                    f"{res}: a CLAM site names the folder of its {res}-res CLAM run (holding {sub}/), relative to "
                    f'{root}; set `{res} = "..."`'
                )
            folder = root / name / sub
            if not folder.is_dir():
                raise _missing(folder, f"CLAM {sub} folder of the {res}-res features", res)
            folders[res] = folder
        return FeatureLocation("clam", cfg.encoder or "clam", folders, f".{cfg.clam_files}")
    encoders = set()
    for res in resolutions:
        name, mag = (cfg.high, cfg.high_magnification) if res == "high" else (cfg.low, cfg.low_magnification)
        key = res if name is not None else f"{res}-magnification"
        mag_dir = _trident_magnification_dir(root, name, mag, key)
        folders[res] = _trident_features_dir(mag_dir, cfg.encoder, "encoder")
        encoders.add(folders[res].name[len(TRIDENT_FEATURES) :])
    suffixes = {_suffix(f) for f in folders.values()}
    return FeatureLocation(
        "trident", "/".join(sorted(encoders)), folders, suffixes.pop() if len(suffixes) == 1 else ".h5"
    )


def locate_folder(folder: Path | str, cfg: FeatureLayoutConfig) -> FeatureLocation:
    """One resolution's folder for `fedslide train --features FOLDER`: the folder itself (fedslide), a CLAM feature
    folder or its h5_files/pt_files, or a TRIDENT job, magnification or features_<encoder> folder (the
    high-res one where a job holds several)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _missing(folder, "features directory", "features-dir")
    if cfg.layout == "fedslide":
        return FeatureLocation("fedslide", cfg.encoder or "", {"high": folder})
    if cfg.layout == "clam":
        sub = CLAM_DIRS[cfg.clam_files]
        target = folder if folder.name == sub else folder / sub
        if not target.is_dir():
            raise ConfigError(
                f"features-dir: {folder} is not a CLAM feature folder (no {sub}/); give the --feat_dir of CLAM's "
                f"extract_features_fp.py or set features-layout.clam-files"
            )
        return FeatureLocation("clam", cfg.encoder or "clam", {"high": target}, f".{cfg.clam_files}")
    if folder.name.startswith(TRIDENT_FEATURES):
        target = folder
    elif TRIDENT_DIR.match(folder.name):
        target = _trident_features_dir(folder, cfg.encoder, "features-layout.encoder")
    else:
        mag_dir = _trident_magnification_dir(folder, cfg.high, cfg.high_magnification, "features-layout.high")
        target = _trident_features_dir(mag_dir, cfg.encoder, "features-layout.encoder")
    return FeatureLocation("trident", target.name[len(TRIDENT_FEATURES) :], {"high": target}, _suffix(target))


def read_bag(path: Path | str, location: FeatureLocation, load_tokens: bool = False) -> FeatureBag:
    """Read one file of the layout; files that do not name their encoder get the layout's label and their dim."""
    bag = read_feature_file(path, load_tokens=load_tokens)
    if location.layout != "fedslide":
        bag.attrs.setdefault("encoder_name", location.encoder)
        bag.attrs.setdefault("encoder_dim", int(bag.features.shape[1]))
    return bag


def _step(bag: FeatureBag) -> float:
    """Level-0 side of a bag's patches: its `patch_size_level0` attribute, else the smallest grid gap of its coords."""
    value = bag.attrs.get("patch_size_level0_exact") or bag.attrs.get("patch_size_level0")
    if value:
        return float(value)
    assert bag.coords is not None
    gaps = [np.diff(np.unique(bag.coords[:, a])) for a in range(2)]
    positive = [float(g[g > 0].min()) for g in gaps if (g > 0).any()]
    if not positive:
        raise FeatureFileError(f"{bag.path}: no 'patch_size_level0' attribute and too few patches to infer it")
    return min(positive)


def pair_bags(low: FeatureBag, high: FeatureBag) -> tuple[FeatureBag, FeatureBag]:
    """(low, high) with the high bag's `parent` and `child` derived from coords where the file lacks them.

    A high patch's parent is the low patch whose square holds its centre; its child slot is row * grid + col
    of its offset in that square (grid = low side / high side, rounded). High patches without a parent are
    dropped (with their features). Raises FeatureFileError naming the file when the pairing cannot be made.
    """
    if high.parent is not None:
        return low, high
    for bag in (low, high):
        if bag.coords is None:
            raise FeatureFileError(
                f"{bag.path}: no 'coords', so its patches cannot be paired with the other resolution's "
                '(CLAM: read h5_files/, clam-files = "h5")'
            )
    assert low.coords is not None and high.coords is not None
    low_side, high_side = _step(low), _step(high)
    grid = int(round(low_side / high_side))
    if grid < 1 or abs(grid * high_side - low_side) > 0.05 * low_side:
        raise FeatureFileError(
            f"{high.path}: high-res patches ({high_side:g} level-0 px) do not tile the low-res patches of "
            f"{low.path.name} ({low_side:g} px) in a whole grid"
        )
    from scipy.spatial import cKDTree  # only where CLAM/TRIDENT bags are paired (keeps scipy out of the ClientApp)

    tree = cKDTree(low.coords.astype(np.float64) + low_side / 2)
    centres = high.coords.astype(np.float64) + high_side / 2
    dist, parent = tree.query(centres, p=np.inf, distance_upper_bound=low_side / 2)
    keep = np.isfinite(dist) & (dist < low_side / 2)
    if not keep.any():
        raise FeatureFileError(f"{high.path}: no high-res patch lies inside a low-res patch of {low.path.name}")
    if not keep.all():
        log.info("%s: %d high-res patch(es) outside every low-res patch left out", high.path, int((~keep).sum()))
    parent = parent[keep].astype(np.int64)
    coords = high.coords[keep]
    offset = (coords - low.coords[parent]) / high_side
    col = np.clip(np.floor(offset[:, 0] + 0.5), 0, grid - 1).astype(np.int64)
    row = np.clip(np.floor(offset[:, 1] + 0.5), 0, grid - 1).astype(np.int64)
    attrs = {**high.attrs, "child_grid": grid, "patch_size_level0": high_side}
    paired = dataclasses.replace(
        high, features=high.features[keep], coords=coords, parent=parent, child=row * grid + col, attrs=attrs
    )
    low_attrs = {**low.attrs, "child_grid": grid, "patch_size_level0": low_side}
    return dataclasses.replace(low, attrs=low_attrs), paired


def clam_paths(clam_dir: Path | str, slide_id: str) -> tuple[Path, Path]:
    """(h5_files/<slide_id>.h5, pt_files/<slide_id>.pt) of a CLAM feature folder."""
    folder = Path(clam_dir)
    return folder / CLAM_DIRS["h5"] / f"{slide_id}.h5", folder / CLAM_DIRS["pt"] / f"{slide_id}.pt"


def write_clam(bag: FeatureBag, clam_dir: Path | str, slide_id: str) -> tuple[Path, Path]:
    """Write one bag as CLAM's feature extraction does: h5_files/<id>.h5 (`features`, `coords`; the bag's attributes
    kept on `coords`) and pt_files/<id>.pt (the features tensor), each renamed into place when complete."""
    import torch

    if bag.coords is None:
        raise FeatureFileError(f"{bag.path}: no 'coords' to write into CLAM's h5_files")
    h5_path, pt_path = clam_paths(clam_dir, slide_id)
    for path in (h5_path, pt_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(h5_path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.asarray(bag.features, dtype=np.float32))
            f.create_dataset("coords", data=np.asarray(bag.coords, dtype=np.int64))
            for key, value in bag.attrs.items():
                if isinstance(value, (str, int, float, bool, np.generic)):
                    f["coords"].attrs[key] = value
    with atomic_path(pt_path) as tmp:
        torch.save(torch.from_numpy(np.asarray(bag.features, dtype=np.float32)), tmp)
    return h5_path, pt_path
