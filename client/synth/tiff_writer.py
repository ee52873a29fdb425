"""Streaming writer of tiled pyramidal TIFFs that OpenSlide opens (Aperio SVS, generic TIFF, plain).

Every level is a tiled page in the main IFD chain (OpenSlide ignores SubIFD pyramids and
rejects stripped TIFFs); tiles are produced one at a time by a callback, so no level is ever
held in memory whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile

from fedslide.common.atomic import atomic_path

TiffStyle = Literal["aperio", "generic", "plain"]
TIFF_STYLES: tuple[str, ...] = ("aperio", "generic", "plain")
Compression = Literal["zlib", "none", "jpeg"]

# tile_fn(level, x, y, width, height) -> uint8 (height, width, 3); x, y in that level's pixels
TileFn = Callable[[int, int, int, int, int], np.ndarray]

SMALL_LEVEL_PX = 1024  # stop adding pyramid levels once a level's longer side is at most this
_CLASSIC_TIFF_LIMIT = int(0.9 * 2**32)


def objective_power(mpp: float) -> float:
    """Nominal objective magnification for a level-0 resolution (10 µm / mpp: 0.25 -> 40×)."""
    return round(10.0 / mpp, 2)


def default_downsamples(style: TiffStyle, width: int, height: int) -> list[int]:
    """Pyramid downsamples: ×4 steps for Aperio (1, 4, 16, ...), ×2 otherwise, until a level is small.

    Always at least two levels.
    """
    step = 4 if style == "aperio" else 2
    downsamples = [1]
    while max(width, height) / downsamples[-1] > SMALL_LEVEL_PX or len(downsamples) < 2:
        downsamples.append(downsamples[-1] * step)
    return downsamples


def level_dimensions(width: int, height: int, downsamples: list[int]) -> list[tuple[int, int]]:
    """(width, height) of each level: ceil(size / downsample)."""
    return [(max(1, math.ceil(width / d)), max(1, math.ceil(height / d))) for d in downsamples]


def _validate(width: int, height: int, mpp: float | None, style: str, downsamples: list[int], tile: int) -> None:
    if style not in TIFF_STYLES:
        raise ValueError(f"unknown TIFF style {style!r}; expected one of {', '.join(TIFF_STYLES)}")
    if width < 1 or height < 1:
        raise ValueError(f"slide size must be positive, got {width}x{height}")
    if style != "plain" and (mpp is None or mpp <= 0):
        raise ValueError(f"style {style!r} needs a positive mpp, got {mpp!r}")
    if not downsamples or downsamples[0] != 1 or any(b <= a for a, b in zip(downsamples, downsamples[1:])):
        raise ValueError(f"downsamples must start at 1 and increase strictly, got {downsamples}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile size must be a positive multiple of 16, got {tile}")


def _description(
    style: str,
    width: int,
    height: int,
    level_w: int,
    level_h: int,
    mpp: float | None,
    tile: int,
    compression: str,
    level: int,
) -> str:
    """ImageDescription of one page: Aperio's header and key = value pairs, else a plain note."""
    if style == "aperio":
        assert mpp is not None
        codec = {"zlib": "Deflate", "none": "Raw", "jpeg": "JPEG/RGB Q=90"}[compression]
        head = f"Aperio Image Library v12.0.0 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
        if level > 0:
            head += f" -> {level_w}x{level_h}"
        return f"{head} {codec}|AppMag = {objective_power(mpp):g}|MPP = {mpp:g}|ScanScope ID = FEDSLIDE-SYNTH"
    return "fedslide synthetic slide" if level == 0 else f"fedslide synthetic slide level {level}"


def _tiles(
    tile_fn: TileFn, level: int, width: int, height: int, tile: int, on_tile: Callable[[], None] | None
) -> Iterator[np.ndarray]:
    """Full-size tiles of one level in row-major order; edge tiles are padded (edge-replicated)."""
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            w = min(tile, width - tx)
            h = min(tile, height - ty)
            data = np.asarray(tile_fn(level, tx, ty, w, h), dtype=np.uint8)
            if data.shape != (h, w, 3):
                raise ValueError(f"tile_fn returned shape {data.shape} for a {h}x{w} RGB tile")
            if (h, w) != (tile, tile):
                data = np.pad(data, ((0, tile - h), (0, tile - w), (0, 0)), mode="edge")
            if on_tile is not None:
                on_tile()
            yield data


def count_tiles(width: int, height: int, downsamples: list[int], tile: int = 256) -> int:
    """Total number of tiles over all levels."""
    return sum(math.ceil(w / tile) * math.ceil(h / tile) for w, h in level_dimensions(width, height, downsamples))


def write_pyramidal_tiff(
    path: Path | str,
    width: int,
    height: int,
    mpp: float | None,
    style: TiffStyle,
    tile_fn: TileFn,
    downsamples: list[int] | None = None,
    *,
    tile: int = 256,
    compression: Compression = "zlib",
    compression_level: int = 1,
    on_tile: Callable[[], None] | None = None,
) -> Path:
    """Write a tiled pyramidal RGB TIFF, pulling tiles from `tile_fn(level, x, y, w, h)`.

    `style` 'aperio' writes an SVS (ImageDescription with AppMag and MPP), 'generic' a TIFF whose
    resolution tags give each level's mpp, 'plain' a TIFF with no resolution metadata at all.
    Level k has size ceil(size / downsamples[k]). BigTIFF is used when the raw pixels could
    pass 4 GB. `on_tile` is called after each tile (progress bars).
    """
    path = Path(path)
    downsamples = list(downsamples) if downsamples is not None else default_downsamples(style, width, height)
    _validate(width, height, mpp, style, downsamples, tile)
    if compression == "jpeg":
        try:
            import imagecodecs  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError("compression 'jpeg' needs the 'imagecodecs' package; use 'zlib' or 'none'") from exc
    levels = level_dimensions(width, height, downsamples)
    raw_bytes = sum(math.ceil(w / tile) * math.ceil(h / tile) * tile * tile * 3 for w, h in levels)
    codec: dict[str, Any] = {}
    if compression == "zlib":
        codec = {"compression": "zlib", "compressionargs": {"level": compression_level}}
    elif compression == "jpeg":
        codec = {"compression": "jpeg", "compressionargs": {"level": 90}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_path(path, suffix=".partial") as tmp,
        tifffile.TiffWriter(tmp, bigtiff=raw_bytes > _CLASSIC_TIFF_LIMIT) as tw,
    ):
        for level, ((lw, lh), d) in enumerate(zip(levels, downsamples)):
            extra: dict[str, Any]
            if style == "generic":
                assert mpp is not None
                per_cm = 10_000.0 / (mpp * d)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            else:
                extra = {"resolution": (1, 1), "resolutionunit": "NONE"}
            if level > 0 and style != "aperio":
                extra["subfiletype"] = 1  # reduced-resolution image: OpenSlide's generic driver needs it
            tw.write(
                _tiles(tile_fn, level, lw, lh, tile, on_tile),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                planarconfig="contig",
                description=_description(style, width, height, lw, lh, mpp, tile, compression, level),
                metadata=None,
                software="fedslide",
                **codec,
                **extra,
            )
    return path
