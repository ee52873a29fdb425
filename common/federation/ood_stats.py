"""Federated OOD statistics on the wire (`common.distillation.ood`): a site's sums of its training slides' mean
5x features as handshake reply arrays, the server's pooling, and the pooled statistics it sends with the evaluation.

The site adds, under the handshake's `stats` record, `ood-sums` [D] float64, `ood-squares` [D] float64 and
`ood-counts` [1] int64 (slides), all zero when it has fewer than suppress-below training slides. The server pools
the releases of at least that many slides and sends `mean` and `var` [D] float64 and `counts` [1] (slides) as the
evaluation's `ood` record; each site sets the flag threshold on its own validation slides (they never leave it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

from fedslide.common.distillation.ood import OODStats, OODSums, ood_sums, pool_ood_sums, slide_embeddings
from fedslide.common.egress import Allowed, ArraySpec
from fedslide.common.federation import phases as ph
from fedslide.common.federation.moments import MomentArrays


OOD_MOMENTS = MomentArrays(ph.OOD_SUMS, ph.OOD_SQUARES, ph.OOD_COUNTS)


def ood_sums_specs(dim: int) -> dict[str, ArraySpec]:
    """The three arrays a site's OOD release adds to the handshake's `stats` record, with their shapes."""
    return OOD_MOMENTS.specs(dim)


def ood_sums_arrays(sums: OODSums) -> dict[str, Array]:
    """The release as arrays of the handshake's `stats` record."""
    return OOD_MOMENTS.arrays(sums.sums, sums.squares, [sums.slides])


def ood_sums_from_record(record: ArrayRecord, dim: int) -> OODSums:
    """A site's release read back at the server; ValueError naming the array when it is missing or malformed."""
    sums, squares, (slides,) = OOD_MOMENTS.read(record, dim)
    return OODSums(sums, squares, slides)


def federated_ood(records: Sequence[ArrayRecord], dim: int, min_slides: int = 0) -> OODStats:
    """Pooled statistics of the sites' releases; a release of fewer than `min_slides` slides counts for nothing
    (the server's own check of the suppression each site applied). No threshold yet: the sites set it."""
    parts = [ood_sums_from_record(record, dim) for record in records]
    kept = [part for part in parts if part.slides >= max(min_slides, 1)]
    return OODStats.from_moments(*pool_ood_sums(kept), source="federated")


def ood_record(stats: OODStats) -> ArrayRecord:
    """The pooled statistics as the evaluation's `ood` record (variances already shrunk)."""
    return ArrayRecord(
        {
            ph.OOD_MEAN: Array(np.asarray(stats.mean, dtype=np.float64)),
            ph.OOD_VAR: Array(np.asarray(stats.var, dtype=np.float64)),
            ph.OOD_COUNTS: Array(np.asarray([stats.slides], dtype=np.int64)),
        }
    )


def ood_from_record(record: ArrayRecord, dim: int) -> OODStats:
    """The server's pooled statistics read at a site; ValueError naming the array when its shape is not [dim], a
    value is not finite or a variance is not > 0."""
    arrays = {}
    for name in (ph.OOD_MEAN, ph.OOD_VAR, ph.OOD_COUNTS):
        if name not in record:
            raise ValueError(f"the {ph.OOD!r} record lacks array {name!r}")
        arrays[name] = record[name].numpy()
    mean, var = arrays[ph.OOD_MEAN].astype(np.float64), arrays[ph.OOD_VAR].astype(np.float64)
    if mean.shape != (dim,) or var.shape != (dim,) or not (np.isfinite(mean).all() and np.isfinite(var).all()):
        raise ValueError(f"arrays {ph.OOD_MEAN!r} / {ph.OOD_VAR!r} of {ph.OOD!r} must be finite [{dim}] arrays")
    if (var <= 0).any():
        raise ValueError(f"array {ph.OOD_VAR!r} of {ph.OOD!r} holds variances <= 0")
    slides = int(arrays[ph.OOD_COUNTS].reshape(-1)[0])
    return OODStats(mean, var, slides, source="federated")


def site_ood_sums(bags: Sequence[np.ndarray], dim: int, min_slides: int) -> OODSums:
    """A site's release of its training slides' low-res feature bags [N_i, D] (zero below `min_slides` slides)."""
    embeddings = slide_embeddings(bags) if len(bags) else np.zeros((0, dim))
    return ood_sums(embeddings, min_slides)


def with_ood_sums(stats: ArrayRecord | None, allowed: Allowed, sums: OODSums, dim: int) -> tuple[ArrayRecord, Allowed]:
    """The handshake's `stats` record (new when None) with the OOD release added, and its egress allowance widened
    to the three OOD arrays."""
    record = stats if stats is not None else ArrayRecord()
    for name, array in ood_sums_arrays(sums).items():
        record[name] = array
    widened = Allowed(ph.HANDSHAKE.name, ph.HANDSHAKE.reply_arrays, {**allowed.arrays, **ood_sums_specs(dim)})
    return record, widened
