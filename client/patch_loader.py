"""Reading and decoding patches in DataLoader workers, re-batched to a fixed encoder batch size."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fedslide.client.slides import SlideReader
from fedslide.client.stain_normalize import StainNormalizer
from fedslide.client.tiling import PairedGrid
from fedslide.common.config.preprocess import TilingConfig


@dataclass
class PatchBatch:
    """A batch of patches ready for the encoder and where each one goes."""

    pixels: torch.Tensor  # [B, 3, H, W] uint8 in channels-last memory (a view of [B, H, W, 3]: no copy to the encoder)
    resolution: list[str]  # "low" / "high" per row
    index: np.ndarray  # [B] index into that resolution's grid arrays
    stain_fallback: np.ndarray  # [B] bool: stain normalisation was asked for but the tile was left as read


class RegionDataset(Dataset):
    """Item k = the patches of low-res grid cell k: the low patch and/or its kept high children ([N, H, W, 3] uint8).

    Each worker process opens its own slide handle (OpenSlide handles are not shared across processes).
    With `stain`, every patch is stain-normalised as read (a high patch on its own, not as part of its block).
    """

    def __init__(
        self,
        slide_path: Path,
        mpp_override: float | None,
        mpp_tolerance: float,
        grid: PairedGrid,
        tiling: TilingConfig,
        want_low: bool,
        want_high: bool,
        stain: StainNormalizer | None = None,
    ):
        self.slide_path = slide_path
        self.mpp_override = mpp_override
        self.mpp_tolerance = mpp_tolerance
        self.grid = grid
        self.tiling = tiling
        self.want_low = want_low
        self.want_high = want_high
        self.stain = stain
        self._reader: SlideReader | None = None
        self._reader_pid: int | None = None

    def __len__(self) -> int:
        return len(self.grid.low_coords)

    def num_patches(self) -> int:
        """Patches this dataset yields (low patches and/or kept high children)."""
        return (len(self.grid.low_coords) if self.want_low else 0) + (
            len(self.grid.high_coords) if self.want_high else 0
        )

    def _slide(self) -> SlideReader:
        info = get_worker_info()
        pid = info.id if info is not None else -1
        if self._reader is None or self._reader_pid != pid:
            self._reader = SlideReader(self.slide_path, self.mpp_override, self.mpp_tolerance)
            self._reader_pid = pid
        return self._reader

    def __getitem__(self, k: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        slide, t, g = self._slide(), self.tiling, self.grid
        patches: list[np.ndarray] = []
        kinds: list[str] = []
        indices: list[int] = []
        x0, y0 = g.low_coords[k]
        if self.want_low:
            patches.append(slide.read_region(x0, y0, t.low_mpp, t.low_patch_size))
            kinds.append("low")
            indices.append(k)
        if self.want_high:
            children = g.children_of(k)
            if len(children):
                side = t.high_patch_size * g.ratio
                block = slide.read_region(x0, y0, t.high_mpp, side)
                for h in children:
                    row, col = divmod(int(g.high_child[h]), g.ratio)
                    s = t.high_patch_size
                    patches.append(block[row * s : (row + 1) * s, col * s : (col + 1) * s])
                    kinds.append("high")
                    indices.append(int(h))
        if not patches:
            empty = np.zeros((0, t.high_patch_size, t.high_patch_size, 3), np.uint8)
            return empty, [], np.zeros(0, np.int64), np.zeros(0, bool)
        sizes = {p.shape[0] for p in patches}
        if len(sizes) > 1:
            raise ValueError("low and high patch sizes differ; encode them in separate passes")
        stacked = np.stack(patches)  # [N, H, W, 3]: stays channels-last up to the encoder
        fell_back = np.zeros(len(kinds), dtype=bool)
        if self.stain is not None:
            normalized, fell_back = self.stain(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))
            stacked = np.ascontiguousarray(normalized.transpose(0, 2, 3, 1))
        return stacked, kinds, np.asarray(indices, dtype=np.int64), fell_back


def _identity(item: Any) -> Any:
    return item


def iterate_batches(
    dataset: RegionDataset, batch_size: int, num_workers: int, pin_memory: bool
) -> Iterator[PatchBatch]:
    """Patches of the dataset in order, in batches of exactly `batch_size` (the last may be smaller)."""
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=False,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    buf_pixels: list[np.ndarray] = []
    buf_kinds: list[str] = []
    buf_index: list[np.ndarray] = []
    buf_fallback: list[np.ndarray] = []
    buffered = 0
    for pixels, kinds, index, fell_back in loader:
        if len(kinds) == 0:
            continue
        buf_pixels.append(pixels)
        buf_kinds.extend(kinds)
        buf_index.append(index)
        buf_fallback.append(fell_back)
        buffered += len(kinds)
        while buffered >= batch_size:
            yield _take(buf_pixels, buf_kinds, buf_index, buf_fallback, batch_size, pin_memory)
            buffered -= batch_size
    if buffered:
        yield _take(buf_pixels, buf_kinds, buf_index, buf_fallback, buffered, pin_memory)


def _take(
    pixels: list[np.ndarray],
    kinds: list[str],
    index: list[np.ndarray],
    fallback: list[np.ndarray],
    n: int,
    pin_memory: bool,
) -> PatchBatch:
    """Pop the first n patches off the buffers (in place)."""
    all_pixels = np.concatenate(pixels) if len(pixels) > 1 else pixels[0]
    all_index = np.concatenate(index) if len(index) > 1 else index[0]
    all_fallback = np.concatenate(fallback) if len(fallback) > 1 else fallback[0]
    head = torch.from_numpy(np.ascontiguousarray(all_pixels[:n])).permute(0, 3, 1, 2)  # channels-last view
    if pin_memory:
        head = head.pin_memory()
    batch = PatchBatch(
        pixels=head, resolution=kinds[:n], index=all_index[:n].copy(), stain_fallback=all_fallback[:n].copy()
    )
    rest_pixels, rest_index, rest_fallback = all_pixels[n:], all_index[n:], all_fallback[n:]
    pixels.clear()
    index.clear()
    fallback.clear()
    del kinds[:n]
    if len(rest_pixels):
        pixels.append(rest_pixels)
        index.append(rest_index)
        fallback.append(rest_fallback)
    return batch
