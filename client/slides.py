"""Slide reading: one abstraction over OpenSlide, resolution-aware (µm per pixel, never level index)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

log = logging.getLogger(__name__)


class SlideError(RuntimeError):
    """A slide cannot be used; the message names the slide and what to do about it."""


class MissingResolutionError(SlideError):
    """The slide has neither mpp nor objective power and no override was given."""


DICOM_SUFFIX = "dcm"


def dicom_instances(folder: Path) -> list[Path]:
    """The DICOM instance files (`*.dcm`, any case) directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == f".{DICOM_SUFFIX}")


def slide_id_of(path: Path) -> str:
    """A slide's id: the file name without extension, or the folder name of a DICOM slide given as its folder."""
    return path.name if path.is_dir() else path.stem


def discover_slides(folder: Path, extensions: list[str]) -> list[Path]:
    """The slides in `folder`, sorted by name: files whose extension is one of `extensions`, and (when "dcm" is
    one of them) DICOM WSIs stored as a sub-folder of `.dcm` instances, one folder per slide.

    Loose `.dcm` files directly in `folder` are grouped by OpenSlide's quickhash (every instance of one DICOM slide
    opens the same slide); each group counts once, as its first file. Files OpenSlide cannot open stay single, so
    they fail later with a reason.
    """
    exts = {e.lower().lstrip(".") for e in extensions}
    if not folder.is_dir():
        return []
    found: list[Path] = []
    loose_dicom: list[Path] = []
    for p in sorted(folder.iterdir()):
        suffix = p.suffix.lower().lstrip(".")
        if p.is_file() and suffix == DICOM_SUFFIX and DICOM_SUFFIX in exts:
            loose_dicom.append(p)
        elif p.is_file() and suffix in exts:
            found.append(p)
        elif p.is_dir() and DICOM_SUFFIX in exts and dicom_instances(p):
            found.append(p)
    found.extend(_one_file_per_dicom_slide(loose_dicom))
    return sorted(found, key=lambda p: p.name)


def _one_file_per_dicom_slide(files: list[Path]) -> list[Path]:
    """The first of each group of `.dcm` files that open as the same slide (same openslide.quickhash-1)."""
    kept: dict[str, Path] = {}
    for f in files:
        try:
            with openslide.OpenSlide(str(f)) as s:
                key = s.properties.get(openslide.PROPERTY_NAME_QUICKHASH1) or str(f)
        except openslide.OpenSlideError:
            key = str(f)
        kept.setdefault(key, f)
    return list(kept.values())


def open_dicom_folder(folder: Path) -> tuple[openslide.OpenSlide, Path]:
    """Open the DICOM WSI stored in `folder` through the first of its `.dcm` instances that OpenSlide reads.

    OpenSlide opens a DICOM slide from any one instance file and finds the rest of its series in the same folder.
    """
    instances = dicom_instances(folder)
    if not instances:
        raise SlideError(f"slide folder {folder}: no .dcm files in it; a DICOM WSI is one folder of .dcm instances")
    errors: list[str] = []
    for f in instances:
        try:
            return openslide.OpenSlide(str(f)), f
        except openslide.OpenSlideError as exc:
            errors.append(f"{f.name}: {exc or type(exc).__name__}")
    shown = "; ".join(errors[:3]) + (f"; ... ({len(errors) - 3} more)" if len(errors) > 3 else "")
    raise SlideError(
        f"slide folder {folder}: none of its {len(instances)} .dcm files is a DICOM whole-slide image OpenSlide can "
        f"open ({shown})"
    )


@dataclass(frozen=True)
class Resolution:
    """µm per level-0 pixel and where that number came from."""

    mpp: float
    source: str  # "mpp", "objective-power" or "override"

    @property
    def magnification(self) -> float:
        """Nominal objective magnification (10 µm / mpp: 0.5 µm/px ≈ 20×)."""
        return 10.0 / self.mpp


def resolution_from_properties(props: dict[str, str], name: str, mpp_override: float | None = None) -> Resolution:
    """Level-0 resolution from OpenSlide properties: mpp, else objective power, else the override."""
    mpp_x, mpp_y = props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
    try:
        if mpp_x is not None and float(mpp_x) > 0:
            mx = float(mpp_x)
            my = float(mpp_y) if mpp_y is not None and float(mpp_y) > 0 else mx
            if abs(mx - my) / mx > 0.01:
                log.warning("%s: non-square pixels (mpp-x %g, mpp-y %g); using their mean", name, mx, my)
            return Resolution((mx + my) / 2.0, "mpp")
    except ValueError:
        log.warning("%s: unreadable mpp properties %r/%r", name, mpp_x, mpp_y)
    power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    try:
        if power is not None and float(power) > 0:
            return Resolution(10.0 / float(power), "objective-power")
    except ValueError:
        log.warning("%s: unreadable objective power %r", name, power)
    if mpp_override is not None:
        return Resolution(float(mpp_override), "override")
    raise MissingResolutionError(
        f"slide {name}: no resolution metadata (neither openslide.mpp-x nor openslide.objective-power); "
        "set the level-0 µm per pixel with --mpp (config key slide.mpp-override), e.g. --mpp 0.5 for a 20× scan"
    )


class SlideReader:
    """A slide opened with OpenSlide, read by target resolution (µm/px) rather than by level index.

    `path` is a slide file, or a folder of DICOM instances (one DICOM WSI; its id is the folder name).
    """

    def __init__(self, path: Path | str, mpp_override: float | None = None, mpp_tolerance: float = 0.05):
        self.path = Path(path)
        self.slide_id = slide_id_of(self.path)
        self.mpp_tolerance = mpp_tolerance
        try:
            if self.path.is_dir():
                self._slide, opened = open_dicom_folder(self.path)
                log.debug("%s: DICOM WSI opened through %s", self.slide_id, opened.name)
            else:
                self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(
                f"slide {self.path.name}: not a slide format OpenSlide can open ({exc or 'unsupported'})"
            ) from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"slide {self.path.name}: unreadable or truncated file ({exc})") from exc
        self.resolution = resolution_from_properties(dict(self._slide.properties), self.path.name, mpp_override)
        self.vendor = self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def mpp(self) -> float:
        return self.resolution.mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._slide.dimensions

    @property
    def level_mpps(self) -> list[float]:
        return [self.mpp * d for d in self._slide.level_downsamples]

    def best_level(self, target_mpp: float) -> int:
        """The coarsest stored level at least as fine as `target_mpp` (within tolerance); level 0 if none is."""
        limit = target_mpp * (1.0 + self.mpp_tolerance)
        candidates = [(m, i) for i, m in enumerate(self.level_mpps) if m <= limit]
        if not candidates:
            log.debug(
                "%s: target %.3f µm/px is finer than level 0 (%.3f): upsampling", self.slide_id, target_mpp, self.mpp
            )
            return 0
        return max(candidates)[1]

    def level0_size(self, size_px: int, target_mpp: float) -> float:
        """How many level-0 pixels `size_px` pixels at `target_mpp` span."""
        return size_px * target_mpp / self.mpp

    def read_region(self, x0: int, y0: int, target_mpp: float, size_px: int) -> np.ndarray:
        """A square RGB uint8 patch [size, size, 3] at `target_mpp` whose top-left is level-0 (x0, y0).

        Reads from the best stored level and resamples (box filter when shrinking); outside the slide is white.
        """
        level = self.best_level(target_mpp)
        level_mpp = self.level_mpps[level]
        read_px = max(1, round(size_px * target_mpp / level_mpp))
        try:
            region = self._slide.read_region((int(x0), int(y0)), level, (read_px, read_px))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"slide {self.path.name}: failed to read a region at ({x0}, {y0}): {exc}") from exc
        if read_px != size_px:
            method = Image.Resampling.BOX if read_px > size_px else Image.Resampling.BILINEAR
            region = region.resize((size_px, size_px), method)
        return rgba_to_rgb(np.asarray(region))

    def thumbnail(self, target_mpp: float) -> tuple[np.ndarray, tuple[float, float]]:
        """An RGB thumbnail near `target_mpp` and its exact (x, y) µm per pixel."""
        w, h = self.dimensions
        size = (max(1, math.ceil(w * self.mpp / target_mpp)), max(1, math.ceil(h * self.mpp / target_mpp)))
        try:
            thumb = self._slide.get_thumbnail(size)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"slide {self.path.name}: failed to read a thumbnail: {exc}") from exc
        arr = np.asarray(thumb.convert("RGB"))
        return arr, (w * self.mpp / arr.shape[1], h * self.mpp / arr.shape[0])


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA onto white (transparent = outside the scanned area)."""
    if rgba.shape[-1] == 3:
        return rgba
    if rgba[..., 3].min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
