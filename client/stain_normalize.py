"""Stain normalisation of tiles before encoding (Macenko or Reinhard, with torchstain), fitted once per job.

Macenko: torchstain's port of the reference code (HEnorm_python), I0 = 240, alpha = 1 %, beta = 0.15. Reinhard:
torchstain's CIELAB mean/std matching. Tiles with too few stained pixels, or where the fit breaks down (too few
distinct optical densities for the eigen-decomposition), are left as read and counted by the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

from fedslide.common.config.base import ConfigError
from fedslide.common.config.preprocess import PreprocessConfig, StainReferenceConfig
from fedslide.common.features import STAIN_ATTR as STAIN_ATTR  # re-exported: the attribute preprocess writes

log = logging.getLogger(__name__)

IO = 240  # transmitted light intensity (torchstain / Macenko reference code default)
BETA = 0.15  # optical density below which a pixel counts as background (same defaults)
ALPHA = 1.0  # percentile of the angle range taken as the stain vectors
MIN_STAINED_PIXELS = 64  # fewer stained pixels than this leave no usable covariance, whatever the fraction


class StainReferenceError(ConfigError):
    """The stain reference could not be read or fitted; names the config key and the file."""


def stained_fraction(tile: np.ndarray) -> tuple[float, int]:
    """Fraction and count of pixels of an RGB uint8 tile [3, H, W] with optical density >= BETA in every channel."""
    od = -np.log((tile.astype(np.float32) + 1.0) / IO)
    stained = np.all(od >= BETA, axis=0)
    return float(stained.mean()), int(stained.sum())


def mean_stain_vectors(tiles: np.ndarray) -> np.ndarray:
    """Unit optical-density vector [3] averaged over the stained pixels of tiles [B, 3, H, W] (a stain-shift probe)."""
    od = -np.log((tiles.astype(np.float64) + 1.0) / IO).transpose(1, 0, 2, 3).reshape(3, -1)
    od = od[:, np.all(od >= BETA, axis=0)]
    mean = od.mean(axis=1)
    return mean / np.linalg.norm(mean)


@dataclass
class StainNormalizer:
    """Maps RGB uint8 tiles onto a fitted reference; built by `build_stain_normalizer`."""

    method: str
    min_tissue_fraction: float
    _impl: TorchMacenkoNormalizer | TorchReinhardNormalizer

    def identity(self) -> dict[str, object]:
        """What decides the normalised pixels: the method and the fitted reference (rounded), never a file path."""
        if self.method == "macenko":
            impl = self._impl
            assert isinstance(impl, TorchMacenkoNormalizer)
            ref = {
                "stain-matrix": np.round(impl.HERef.double().numpy(), 6).tolist(),
                "max-concentrations": np.round(impl.maxCRef.double().numpy(), 6).tolist(),
            }
        else:
            ref = {
                "lab-means": np.round(self._impl.target_means.double().numpy(), 6).tolist(),
                "lab-stds": np.round(self._impl.target_stds.double().numpy(), 6).tolist(),
            }
        return {"method": self.method, "min-tissue-fraction": self.min_tissue_fraction, **ref}

    def normalize_tile(self, tile: np.ndarray) -> np.ndarray | None:
        """The normalised tile [3, H, W] uint8, or None where it has too little stain or the fit breaks down."""
        fraction, count = stained_fraction(tile)
        if count < MIN_STAINED_PIXELS or fraction < self.min_tissue_fraction:
            return None
        x = torch.from_numpy(np.ascontiguousarray(tile))
        try:
            with torch.inference_mode():
                if self.method == "macenko":
                    out, _, _ = self._impl.normalize(x, Io=IO, alpha=ALPHA, beta=BETA, stains=False)
                else:
                    # torchstain's Reinhard casts without clipping and divides by the tile's own std
                    out = self._impl.normalize(x)
        except (RuntimeError, ValueError, IndexError):  # torch.linalg errors derive from RuntimeError
            return None
        result = out.numpy()
        if result.min() < 0 or result.max() > 255:  # NaN concentrations cast to INT_MIN
            return None
        return np.ascontiguousarray(result.astype(np.uint8).transpose(2, 0, 1))

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalise tiles [B, 3, H, W] uint8; returns (tiles, fell_back [B] bool) with fallbacks left as read."""
        out = tiles.copy()
        fell_back = np.zeros(len(tiles), dtype=bool)
        for i, tile in enumerate(tiles):
            normed = self.normalize_tile(tile)
            if normed is None:
                fell_back[i] = True
            else:
                out[i] = normed
        return out, fell_back


def _read_reference(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise StainReferenceError(
            f"preprocess.stain-reference.image = {str(path)!r}: cannot read it as an RGB image ({exc})"
        ) from exc
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def build_stain_normalizer(cfg: PreprocessConfig) -> StainNormalizer | None:
    """The normaliser `stain-normalize` asks for (None for 'none'), fitted once from the reference."""
    method, ref = cfg.stain_normalize, cfg.stain_reference
    if method == "none":
        return None
    impl: TorchMacenkoNormalizer | TorchReinhardNormalizer
    if method == "macenko":
        impl = TorchMacenkoNormalizer()  # holds the reference code's stain matrix until fitted or set
        if ref.image is not None:
            _fit(impl, ref, method)
        elif ref.stain_matrix is not None and ref.max_concentrations is not None:
            impl.HERef = torch.tensor(ref.stain_matrix, dtype=torch.float32)
            impl.maxCRef = torch.tensor(ref.max_concentrations, dtype=torch.float32)
    else:
        impl = TorchReinhardNormalizer()
        if ref.image is not None:
            _fit(impl, ref, method)
        else:
            assert ref.lab_means is not None and ref.lab_stds is not None  # the config validator guarantees it
            impl.target_means = torch.tensor(ref.lab_means, dtype=torch.float32)
            impl.target_stds = torch.tensor(ref.lab_stds, dtype=torch.float32)
    normalizer = StainNormalizer(method, ref.min_tissue_fraction, impl)
    log.info("stain normalisation: %s", normalizer.identity())
    return normalizer


def stain_normalizer_from_identity(identity: dict[str, Any]) -> StainNormalizer | None:
    """Rebuild the normaliser a feature file records under STAIN_ATTR (inline reference; no image needed)."""
    method = identity.get("method", "none")
    fields = {k: v for k, v in identity.items() if k != "method"}
    return build_stain_normalizer(
        PreprocessConfig.model_validate({"stain-normalize": method, "stain-reference": fields})
    )


def _fit(impl: TorchMacenkoNormalizer | TorchReinhardNormalizer, ref: StainReferenceConfig, method: str) -> None:
    assert ref.image is not None
    path = Path(ref.image).expanduser()
    if not path.is_file():
        raise StainReferenceError(f"preprocess.stain-reference.image = {str(path)!r}: no such file")
    image = _read_reference(path)
    fraction, count = stained_fraction(image.numpy())
    if count < MIN_STAINED_PIXELS:
        raise StainReferenceError(
            f"preprocess.stain-reference.image = {str(path)!r}: only {count} stained pixels ({fraction:.1%}); "
            "the reference must show well-stained tissue"
        )
    try:
        if isinstance(impl, TorchMacenkoNormalizer):
            impl.fit(image, Io=IO, alpha=ALPHA, beta=BETA)
            fitted = torch.cat([impl.HERef.flatten(), impl.maxCRef.flatten()])
        else:
            impl.fit(image)
            fitted = torch.cat([impl.target_means, impl.target_stds])
    except (RuntimeError, ValueError, IndexError) as exc:
        raise StainReferenceError(
            f"preprocess.stain-reference.image = {str(path)!r}: the {method} fit failed ({exc})"
        ) from exc
    if not bool(torch.isfinite(fitted).all()):
        raise StainReferenceError(
            f"preprocess.stain-reference.image = {str(path)!r}: the {method} fit gave non-finite values"
        )
