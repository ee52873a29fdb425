"""A site's clinical-vector sums on the wire: the handshake's `stats` record carries them beside the feature sums
(`common.clinical.site_clinical_sums` computes them; suppressed as a whole below `min_slides`).

Kept apart from `common.clinical` (reading and encoding tables) so that the Flower-free commands (distill,
predict) can read clinical tables without importing Flower.
"""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedslide.common.egress import Allowed, arrays_reply
from fedslide.common.federation import phases as ph
from fedslide.common.federation.moments import MomentArrays
from fedslide.common.training.standardize import FeatureSums

CLINICAL_MOMENTS = MomentArrays(ph.CLINICAL_SUMS, ph.CLINICAL_SQUARES, ph.CLINICAL_COUNTS)


def clinical_sums_allowed(dim: int) -> Allowed:
    """The handshake reply carrying a site's clinical sums of `dim` encoded columns: these arrays, these shapes."""
    return arrays_reply(ph.HANDSHAKE.name, CLINICAL_MOMENTS.specs(dim))


def clinical_sums_record(sums: FeatureSums) -> ArrayRecord:
    """The release as arrays of the handshake's `stats` record."""
    return CLINICAL_MOMENTS.record(sums.sums, sums.squares, [sums.slides])


def clinical_sums_from_record(record: ArrayRecord, dim: int) -> FeatureSums:
    """A site's release read back at the server; ValueError naming the array when a shape or value is off."""
    sums, squares, (slides,) = CLINICAL_MOMENTS.read(record, dim)
    return FeatureSums(sums, squares, slides, slides)


def with_clinical_sums(
    stats: ArrayRecord | None, allowed: Allowed, sums: FeatureSums, dim: int
) -> tuple[ArrayRecord, Allowed]:
    """The handshake's `stats` record (new when None) with the clinical release added, and its egress allowance
    widened to the three clinical arrays."""
    record = stats if stats is not None else ArrayRecord()
    for name, array in clinical_sums_record(sums).items():
        record[name] = array
    widened = Allowed(ph.HANDSHAKE.name, ph.HANDSHAKE.reply_arrays, {**allowed.arrays, **CLINICAL_MOMENTS.specs(dim)})
    return record, widened
