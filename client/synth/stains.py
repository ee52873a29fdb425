"""H&E stain appearance: stain vectors, per-site shifts and per-slide jitter (Beer–Lambert)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Optical density per unit stain in R, G, B (the reference H&E vectors of Macenko's normalisation).
REFERENCE_HEMATOXYLIN = (0.5626, 0.7201, 0.4062)
REFERENCE_EOSIN = (0.2159, 0.8012, 0.5581)
REFERENCE_BACKGROUND = (0.035, 0.038, 0.030)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.02, None)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Stain:
    """How a slide is stained: unit OD vectors, stain amounts and the glass's own OD."""

    hematoxylin: tuple[float, float, float] = REFERENCE_HEMATOXYLIN
    eosin: tuple[float, float, float] = REFERENCE_EOSIN
    h_scale: float = 1.0
    e_scale: float = 1.0
    background: tuple[float, float, float] = REFERENCE_BACKGROUND

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (rounded)."""
        return {
            k: ([round(float(x), 5) for x in v] if isinstance(v, tuple) else round(float(v), 5))
            for k, v in asdict(self).items()
        }

    def od_matrix(self) -> np.ndarray:
        """float32 (3, 3): rows are the H, E and background OD vectors, H and E scaled."""
        return np.array(
            [np.array(self.hematoxylin) * self.h_scale, np.array(self.eosin) * self.e_scale, self.background],
            dtype=np.float32,
        )


def perturb_stain(base: Stain, strength: float, rng: np.random.Generator) -> Stain:
    """A stain whose vectors and amounts are shifted from `base`; `strength` 1 ≈ a typical lab difference.

    Vector directions get Gaussian noise (σ = 0.06·strength per OD channel), stain amounts a
    log-normal factor (σ = 0.12·strength) and the background a small tint.
    """
    if strength <= 0:
        return base
    h = _unit(np.array(base.hematoxylin) + rng.normal(0.0, 0.06 * strength, 3))
    e = _unit(np.array(base.eosin) + rng.normal(0.0, 0.06 * strength, 3))
    h_scale = base.h_scale * float(np.exp(rng.normal(0.0, 0.12 * strength)))
    e_scale = base.e_scale * float(np.exp(rng.normal(0.0, 0.12 * strength)))
    bg = np.clip(np.array(base.background) + rng.normal(0.0, 0.008 * strength, 3), 0.005, 0.12)
    return Stain(
        hematoxylin=tuple(float(v) for v in h),  # type: ignore[arg-type]
        eosin=tuple(float(v) for v in e),  # type: ignore[arg-type]
        h_scale=h_scale,
        e_scale=e_scale,
        background=tuple(float(v) for v in bg),  # type: ignore[arg-type]
    )


def stain_from_dict(data: dict[str, Any]) -> Stain:
    """Inverse of Stain.to_dict."""
    return Stain(
        hematoxylin=tuple(data["hematoxylin"]),
        eosin=tuple(data["eosin"]),
        h_scale=float(data["h_scale"]),
        e_scale=float(data["e_scale"]),
        background=tuple(data["background"]),
    )
