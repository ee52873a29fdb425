"""Federated standardisation on the wire: a site's feature sums as handshake reply arrays, and the server's pooling.

The site sends, under the handshake's `stats` record, exactly three arrays (common/federation/phases.py):
`feature-sums` [D] float64, `feature-squares` [D] float64 and `feature-counts` [2] int64 (instances, slides),
all zero when the site has fewer than suppress-below training slides (`site_feature_sums`). The server pools
the releases it receives into one FeatureStats (`pooled_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

from fedslide.common.egress import Allowed, arrays_reply
from fedslide.common.federation import phases as ph
from fedslide.common.federation.moments import MomentArrays
from fedslide.common.training.standardize import FeatureStats, FeatureSums, pooled_stats


FEATURE_MOMENTS = MomentArrays(ph.FEATURE_SUMS, ph.FEATURE_SQUARES, ph.FEATURE_COUNTS, 2, "instances, slides")


def feature_sums_allowed(dim: int) -> Allowed:
    """The handshake reply carrying a site's feature sums of `dim` features: these three arrays, these shapes."""
    return arrays_reply(ph.HANDSHAKE.name, FEATURE_MOMENTS.specs(dim))


def feature_sums_record(sums: FeatureSums) -> ArrayRecord:
    """The release as the handshake's `stats` record."""
    return FEATURE_MOMENTS.record(sums.sums, sums.squares, [sums.count, sums.slides])


def feature_sums_from_record(record: ArrayRecord, dim: int) -> FeatureSums:
    """A site's release read back at the server; ValueError naming the array when a shape or count is off."""
    sums, squares, (instances, slides) = FEATURE_MOMENTS.read(record, dim)
    return FeatureSums(sums, squares, instances, slides)


def federated_stats(
    records: Sequence[ArrayRecord], dim: int, min_slides: int = 0, clip: float | None = None
) -> FeatureStats:
    """Pooled statistics of the sites' releases; a release of fewer than `min_slides` slides counts for nothing
    (the server's own check of the suppression each site applied)."""
    parts = [feature_sums_from_record(record, dim) for record in records]
    return pooled_stats([part for part in parts if part.slides >= max(min_slides, 1)], clip)


def stats_record(stats: FeatureStats) -> ArrayRecord:
    """The server's pooled statistics as the `standardize` record of its later messages (`mean`, `std`: [D])."""
    return ArrayRecord(
        {
            ph.FEATURE_MEAN: Array(np.asarray(stats.mean, dtype=np.float32)),
            ph.FEATURE_STD: Array(np.asarray(stats.std, dtype=np.float32)),
            ph.FEATURE_COUNTS: Array(np.asarray([stats.count], dtype=np.int64)),
        }
    )


def stats_from_record(record: ArrayRecord, dim: int) -> FeatureStats:
    """The statistics a server message carries, read at a site; ValueError naming the array when its shape is not
    [dim], a value is not finite or an sd is not > 0."""
    arrays = {}
    for name in (ph.FEATURE_MEAN, ph.FEATURE_STD):
        if name not in record:
            raise ValueError(f"the {ph.STANDARDIZE!r} record lacks array {name!r}")
        arrays[name] = record[name].numpy().astype(np.float32)
        if arrays[name].shape != (dim,) or not np.isfinite(arrays[name]).all():
            raise ValueError(
                f"array {name!r} of {ph.STANDARDIZE!r} has shape {arrays[name].shape} (expected ({dim},)) "
                "or non-finite values"
            )
    if (arrays[ph.FEATURE_STD] <= 0).any():
        raise ValueError(f"array {ph.FEATURE_STD!r} of {ph.STANDARDIZE!r} holds sds <= 0")
    count = int(record[ph.FEATURE_COUNTS].numpy().reshape(-1)[0]) if ph.FEATURE_COUNTS in record else 0
    return FeatureStats(mean=arrays[ph.FEATURE_MEAN], std=arrays[ph.FEATURE_STD], count=count)
