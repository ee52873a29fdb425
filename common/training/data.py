"""Bags as a torch Dataset, padded multi-bag batches with a mask, and deterministic batch orders."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from fedslide.common.training.cohort import Cohort
from fedslide.common.training.standardize import FeatureStats

Indices = Sequence[int] | np.ndarray  # slide positions in a cohort


@dataclass
class BagItem:
    """One bag: features [N, D], coords [N, 2] or None, its class and its slide index in the cohort."""

    features: torch.Tensor
    coords: torch.Tensor | None
    label: int
    index: int


@dataclass
class BagBatch:
    """B bags padded to the longest: features [B, N, D] (zeros where padded), mask [B, N] (True = real)."""

    features: torch.Tensor
    mask: torch.Tensor
    coords: torch.Tensor | None
    labels: torch.Tensor  # [B] int64
    indices: torch.Tensor  # [B] int64 slide indices into the cohort

    def to(self, device: torch.device | str) -> "BagBatch":
        """The same batch on `device`."""
        return BagBatch(
            features=self.features.to(device, non_blocking=True),
            mask=self.mask.to(device, non_blocking=True),
            coords=None if self.coords is None else self.coords.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            indices=self.indices,
        )


class BagDataset(Dataset[BagItem]):
    """The cohort's slides `indices`, standardised by `stats` when given; in training, bags longer than
    `max_instances` are randomly subsampled.

    Subsampling draws from torch's RNG (seeded per run, and per worker by the DataLoader) and keeps
    the instances in file order.
    """

    def __init__(
        self, cohort: Cohort, indices: Indices, max_instances: int | None = None, stats: FeatureStats | None = None
    ):
        self.cohort = cohort
        self.indices = [int(i) for i in indices]
        self.max_instances = max_instances
        self.stats = stats

    def __len__(self) -> int:
        return len(self.indices)

    def lengths(self) -> list[int]:
        """Instances per bag as returned by __getitem__ (after the cap)."""
        cap = self.max_instances
        return [min(self.cohort.slides[i].num_instances, cap or 1 << 62) for i in self.indices]

    def __getitem__(self, position: int) -> BagItem:
        index = self.indices[position]
        features_np, coords_np = self.cohort.load(index)
        features = torch.from_numpy(features_np)
        coords = None if coords_np is None else torch.from_numpy(coords_np)
        n = features.shape[0]
        if self.max_instances is not None and n > self.max_instances:
            keep = torch.randperm(n)[: self.max_instances].sort().values
            features = features[keep]
            coords = None if coords is None else coords[keep]
        if self.stats is not None:
            features = self.stats.apply(features)
        return BagItem(features=features, coords=coords, label=self.cohort.slides[index].label, index=index)


def collate_bags(items: Sequence[BagItem]) -> BagBatch:
    """Pad bags to the longest in the batch (zeros) and build the mask."""
    lengths = torch.tensor([item.features.shape[0] for item in items])
    if len(items) == 1:  # nothing to pad: no copy
        features = items[0].features.unsqueeze(0)
    else:
        features = pad_sequence([item.features for item in items], batch_first=True)
    mask = torch.arange(features.shape[1])[None, :] < lengths[:, None]
    coords = None
    if all(item.coords is not None for item in items):
        coords_list: list[torch.Tensor] = [item.coords for item in items]  # type: ignore[misc]
        coords = coords_list[0].unsqueeze(0) if len(items) == 1 else pad_sequence(coords_list, batch_first=True)
    return BagBatch(
        features=features,
        mask=mask,
        coords=coords,
        labels=torch.tensor([item.label for item in items], dtype=torch.int64),
        indices=torch.tensor([item.index for item in items], dtype=torch.int64),
    )


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Random batches of bags of similar length, so little of each batch is padding.

    Each epoch: shuffle, cut into pools of `batch_size * pool_batches` bags, sort each pool by
    length, cut pools into batches and shuffle the batches. All randomness comes from `generator`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        generator: torch.Generator,
        pool_batches: int = 16,
    ):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.pool = batch_size * pool_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=lambda i: -self.lengths[i])
            batches.extend(pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size))
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Fixed evaluation batches of bags sorted by length (longest first), to minimise padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def train_loader(
    dataset: BagDataset, batch_size: int, seed: int, num_workers: int = 0, group_by_length: bool = True
) -> DataLoader:
    """Shuffled training batches; the batch order depends only on `seed` and the epoch.

    Instance subsampling draws from torch's global RNG in the main process, or from per-worker
    seeds (derived from `seed`) with workers: reproducible for a given num_workers.
    """
    order = torch.Generator().manual_seed(seed)
    sampler: Sampler[list[int]]
    if group_by_length and batch_size > 1:
        sampler = LengthGroupedBatchSampler(dataset.lengths(), batch_size, order)
    else:
        sampler = BatchSampler(RandomSampler(dataset, generator=order), batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        generator=torch.Generator().manual_seed(seed + 7919),  # worker seeds, apart from the batch order
        collate_fn=collate_bags,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def eval_loader(dataset: BagDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Evaluation batches in a fixed length-sorted order (results carry slide indices)."""
    return DataLoader(
        dataset,
        batch_sampler=sorted_batches(dataset.lengths(), batch_size),
        collate_fn=collate_bags,
        num_workers=num_workers,
    )
