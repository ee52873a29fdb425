"""Counter-based noise: the same µm position always gets the same value, whichever tile asks.

Everything here is a pure function of integer lattice/cell coordinates and a 64-bit key, so
rendering is independent of how a slide is cut into tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFT30 = np.uint64(30)
_SHIFT27 = np.uint64(27)
_SHIFT31 = np.uint64(31)
_SHIFT32 = np.uint64(32)
_SHIFT40 = np.uint64(40)
_INV_2_24 = np.float32(1.0 / (1 << 24))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser applied elementwise to a uint64 array (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _SHIFT30)) * _MIX1
    z = (z ^ (z >> _SHIFT27)) * _MIX2
    return z ^ (z >> _SHIFT31)


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, channel ids...), stable across runs and platforms."""
    acc = np.zeros(1, dtype=np.uint64)
    for part in parts:
        acc = splitmix64(acc ^ np.array([part & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(acc[0])


def hash_grid(iy: np.ndarray, ix: np.ndarray, key: int) -> np.ndarray:
    """uint64 hash of every (row, column) pair of integer coordinates: shape (len(iy), len(ix))."""
    hy = splitmix64(iy.astype(np.int64).view(np.uint64) ^ np.uint64(key))
    hx = ix.astype(np.int64).view(np.uint64) << _SHIFT32 | (ix.astype(np.int64).view(np.uint64) >> _SHIFT32)
    return splitmix64(hy[:, None] ^ hx[None, :])


def uniform_grid(iy: np.ndarray, ix: np.ndarray, key: int, count: int = 1) -> list[np.ndarray]:
    """`count` independent float32 uniforms in [0, 1) per (row, column) cell."""
    h = hash_grid(iy, ix, key)
    out = []
    for i in range(count):
        if i:
            h = splitmix64(h)
        out.append((h >> _SHIFT40).astype(np.float32) * _INV_2_24)
    return out


@dataclass(frozen=True)
class Axis:
    """Sample positions along one axis: global integer sample index and position in µm."""

    index: np.ndarray  # int64 global sample index
    um: np.ndarray  # float64 sample centre, µm

    @classmethod
    def make(cls, start: int, count: int, spacing_um: float) -> "Axis":
        """Samples start..start+count-1 of a grid with the given spacing, centres at (i + 0.5) * spacing."""
        index = np.arange(start, start + count, dtype=np.int64)
        return cls(index=index, um=(index + 0.5) * spacing_um)


def _lattice_weights(um: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice index range, per-sample local index and smoothstep weight for value noise."""
    u = um / spacing
    cell = np.floor(u).astype(np.int64)
    lo = int(cell[0])
    hi = int(cell[-1]) + 1
    t = (u - cell).astype(np.float32)
    t = t * t * (np.float32(3.0) - np.float32(2.0) * t)
    return np.arange(lo, hi + 1, dtype=np.int64), cell - lo, t


def value_noise(ys: Axis, xs: Axis, spacing_y: float, spacing_x: float, key: int) -> np.ndarray:
    """Smooth value noise in [0, 1] (mean 0.5) on an anisotropic lattice, float32 (len(ys), len(xs))."""
    ly, ry, ty = _lattice_weights(ys.um, spacing_y)
    lx, rx, tx = _lattice_weights(xs.um, spacing_x)
    (lattice,) = uniform_grid(ly, lx, key)
    rows = lattice[ry] * (np.float32(1.0) - ty)[:, None]
    rows += lattice[ry + 1] * ty[:, None]
    out = np.take(rows, rx, axis=1)
    out *= np.float32(1.0) - tx
    out += np.take(rows, rx + 1, axis=1) * tx
    return out


def sample_field(field: np.ndarray, spacing: float, ys: Axis, xs: Axis) -> np.ndarray:
    """Bilinear sample of a coarse field whose node (i, j) sits at (i * spacing, j * spacing) µm.

    Positions outside the field take the value of the nearest edge node.
    """
    ny, nx = field.shape
    uy = np.clip(ys.um / spacing, 0.0, ny - 1.000001)
    ux = np.clip(xs.um / spacing, 0.0, nx - 1.000001)
    iy = np.floor(uy).astype(np.int64)
    ix = np.floor(ux).astype(np.int64)
    ty = (uy - iy).astype(np.float32)
    tx = (ux - ix).astype(np.float32)
    y0, y1 = int(iy.min()), int(iy.max()) + 2
    x0, x1 = int(ix.min()), int(ix.max()) + 2
    sub = np.ascontiguousarray(field[y0:y1, x0:x1], dtype=np.float32)
    iy -= y0
    ix -= x0
    rows = sub[iy] * (np.float32(1.0) - ty)[:, None]
    rows += sub[iy + 1] * ty[:, None]
    out = np.take(rows, ix, axis=1)
    out *= np.float32(1.0) - tx
    out += np.take(rows, ix + 1, axis=1) * tx
    return out


def field_window_max(field: np.ndarray, spacing: float, ys: Axis, xs: Axis) -> float:
    """Largest node value of a coarse field among the nodes that influence the given samples."""
    ny, nx = field.shape
    y0 = int(np.clip(np.floor(ys.um[0] / spacing), 0, ny - 1))
    y1 = int(np.clip(np.floor(ys.um[-1] / spacing) + 2, 1, ny))
    x0 = int(np.clip(np.floor(xs.um[0] / spacing), 0, nx - 1))
    x1 = int(np.clip(np.floor(xs.um[-1] / spacing) + 2, 1, nx))
    return float(field[y0:y1, x0:x1].max())


@dataclass(frozen=True)
class NucleusLayer:
    """A population of elliptical nuclei, at most one per square cell of `cell_um`."""

    cell_um: float
    occupancy: float  # probability that a cell holds a nucleus
    radius_um: tuple[float, float]  # range of the major semi-axis
    aspect: tuple[float, float]  # range of minor/major
    darkness: tuple[float, float]  # range of the per-nucleus hematoxylin amount
    key: int


_FAR = np.float32(1.0e7)


def nuclei(x: np.ndarray, y: np.ndarray, spacing: float, layer: NucleusLayer) -> tuple[np.ndarray, np.ndarray]:
    """Coverage in [0, 1] and per-nucleus darkness at sample positions `x`, `y` (µm, float32 2-D arrays).

    Each nucleus lies wholly in its cell of the (possibly warped) coordinates, so a sample only
    looks at its own cell. Edges ramp over about one sample spacing, symmetrically in squared
    normalised radius, which keeps a nucleus's mean coverage independent of the spacing.
    """
    c = np.float32(layer.cell_um)
    r_mean = 0.5 * (layer.radius_um[0] + layer.radius_um[1])
    k = np.float32(max(0.5, r_mean / (2.0 * spacing)))
    grow = float(np.sqrt(1.0 + 1.0 / (2.0 * float(k))))  # outer edge of the ramp / nominal radius

    fx = np.floor(x / c)
    fy = np.floor(y / c)
    cx0, cx1 = int(fx.min()), int(fx.max())
    cy0, cy1 = int(fy.min()), int(fy.max())
    cell_cols = np.arange(cx0, cx1 + 1, dtype=np.int64)
    cell_rows = np.arange(cy0, cy1 + 1, dtype=np.int64)
    u_present, u_r, u_aspect, u_orient, u_jx, u_jy, u_dark = uniform_grid(cell_rows, cell_cols, layer.key, 7)

    major = layer.radius_um[0] + (layer.radius_um[1] - layer.radius_um[0]) * u_r
    minor = major * (layer.aspect[0] + (layer.aspect[1] - layer.aspect[0]) * u_aspect)
    horizontal = u_orient < 0.5
    limit = np.float32(0.5 * layer.cell_um - 0.05)
    rad_x = np.minimum(np.where(horizontal, major, minor), limit / grow)
    rad_y = np.minimum(np.where(horizontal, minor, major), limit / grow)
    jit_x = np.maximum(limit - rad_x * grow, 0.0)
    jit_y = np.maximum(limit - rad_y * grow, 0.0)
    present = u_present < layer.occupancy
    cen_x = np.where(present, (cell_cols[None, :] + 0.5) * c + (2.0 * u_jx - 1.0) * jit_x, _FAR).astype(np.float32)
    cen_y = ((cell_rows[:, None] + 0.5) * c + (2.0 * u_jy - 1.0) * jit_y).astype(np.float32)
    scale = np.sqrt(k)
    inv_rx = (scale / rad_x).astype(np.float32)
    inv_ry = (scale / rad_y).astype(np.float32)
    dark = (layer.darkness[0] + (layer.darkness[1] - layer.darkness[0]) * u_dark).astype(np.float32)

    cell = (fy - np.float32(cy0)).astype(np.intp)
    cell *= len(cell_cols)
    cell += (fx - np.float32(cx0)).astype(np.intp)

    dx = x - np.take(cen_x.ravel(), cell)
    dx *= np.take(inv_rx.ravel(), cell)
    dx *= dx
    dy = y - np.take(cen_y.ravel(), cell)
    dy *= np.take(inv_ry.ravel(), cell)
    dy *= dy
    dx += dy
    np.subtract(np.float32(0.5) + k, dx, out=dx)
    np.clip(dx, np.float32(0.0), np.float32(1.0), out=dx)
    return dx, np.take(dark.ravel(), cell)
