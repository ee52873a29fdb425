"""HED stain jitter (Tellez et al. 2018): perturb each patch's haematoxylin, eosin and DAB channels."""

from __future__ import annotations

import numpy as np
import torch
from skimage.color import hed2rgb, rgb2hed


def hed_jitter(pixels: torch.Tensor, rng: np.random.Generator, sigma: float, bias: float) -> torch.Tensor:
    """uint8 patches [B, 3, H, W] with h' = h * (1 + a) + b per patch and HED channel, a ~ U(±sigma), b ~ U(±bias)."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"hed_jitter expects uint8 patches [B, 3, H, W]; got {pixels.dtype} {tuple(pixels.shape)}")
    if sigma == 0 and bias == 0:
        return pixels
    out = np.empty(tuple(pixels.shape), dtype=np.uint8)
    images = pixels.permute(0, 2, 3, 1).cpu().numpy()
    for i, image in enumerate(images):
        alpha = rng.uniform(-sigma, sigma, size=3)
        beta = rng.uniform(-bias, bias, size=3)
        hed = rgb2hed(image) * (1.0 + alpha) + beta
        rgb = np.clip(hed2rgb(hed), 0.0, 1.0)
        out[i] = (rgb * 255.0 + 0.5).astype(np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(out)
