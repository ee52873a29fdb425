"""Encoding the patches of a paired grid: the one loop shared by preprocessing and inference.

Both `fedslide preprocess` and `fedslide predict` go through `encode_grid`, so the features a
model is trained on and the features it sees at inference come from the same code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedslide.client.encoders.base import PatchEncoder
from fedslide.client.patch_loader import RegionDataset, iterate_batches


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for `precision` ('auto' = bf16 on a GPU, fp32 on the CPU)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class EncodedBatch:
    """One encoder batch: which grid patches it holds and their embeddings."""

    resolution: np.ndarray  # [B] "low" / "high"
    index: np.ndarray  # [B] index into that resolution's grid arrays
    features: np.ndarray  # [B, D] float32
    tokens: np.ndarray | None  # [B, G*G, D] float32, or None
    stain_fallback: np.ndarray | None = None  # [B] bool: tile left as read where stain normalisation failed

    def __len__(self) -> int:
        return int(self.index.shape[0])


# Starting DataLoader workers costs ~0.4 s per pass here; below this many patches the main process
# reads them itself (on a CPU reading is ~5-10 % of encoding, so little overlap is lost).
WORKERS_FROM_PATCHES = 256


def encode_grid(
    dataset: RegionDataset,
    encoder: PatchEncoder,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str = "auto",
    token_grid: int = 0,
) -> Iterator[EncodedBatch]:
    """Read the dataset's patches in DataLoader workers and encode them in fixed-size batches, in grid order.

    Passes of fewer than WORKERS_FROM_PATCHES patches are read in the main process.
    """
    pin = device.type == "cuda"
    if dataset.num_patches() < WORKERS_FROM_PATCHES:
        num_workers = 0
    with torch.inference_mode(), autocast_for(device, precision):
        for batch in iterate_batches(dataset, batch_size, num_workers, pin):
            x = batch.pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            feats, tokens = encoder.encode(x, token_grid=token_grid)
            yield EncodedBatch(
                resolution=np.asarray(batch.resolution),
                index=batch.index,
                features=feats.float().cpu().numpy(),
                tokens=tokens.float().cpu().numpy() if tokens is not None else None,
                stain_fallback=batch.stain_fallback,
            )
