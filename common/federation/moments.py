"""A per-feature moments release on the wire: sums [D] and sums of squares [D] (float64) and counts [n] (int64).

Federated standardisation, the OOD statistics and the clinical normalisation each send one such release in the
handshake's `stats` record under their own three array names; this module declares, writes and reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from fedslide.common.egress import ArraySpec


@dataclass(frozen=True)
class MomentArrays:
    """The three array names of one release and how many counts it carries (`counts_meaning` for errors)."""

    sums: str
    squares: str
    counts: str
    n_counts: int = 1
    counts_meaning: str = "slides"

    def specs(self, dim: int) -> dict[str, ArraySpec]:
        """The arrays with their shapes and dtypes, as the egress policy declares them."""
        return {
            self.sums: ArraySpec((dim,), "float64"),
            self.squares: ArraySpec((dim,), "float64"),
            self.counts: ArraySpec((self.n_counts,), "int64"),
        }

    def arrays(self, sums: np.ndarray, squares: np.ndarray, counts: Sequence[int]) -> dict[str, Array]:
        """The release as arrays of a record."""
        return {
            self.sums: Array(np.asarray(sums, dtype=np.float64)),
            self.squares: Array(np.asarray(squares, dtype=np.float64)),
            self.counts: Array(np.asarray(list(counts), dtype=np.int64)),
        }

    def record(self, sums: np.ndarray, squares: np.ndarray, counts: Sequence[int]) -> ArrayRecord:
        """The release as a record of its own."""
        return ArrayRecord(self.arrays(sums, squares, counts))

    def read(self, record: ArrayRecord, dim: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(sums, squares, counts) of a site's release read back at the server; ValueError naming the array when it
        is missing, has another shape, holds non-finite values, negative squares or negative counts."""
        missing = [name for name in (self.sums, self.squares, self.counts) if name not in record]
        if missing:
            raise ValueError(f"the reply lacks array(s) {', '.join(missing)}")
        sums = record[self.sums].numpy().astype(np.float64)
        squares = record[self.squares].numpy().astype(np.float64)
        counts = record[self.counts].numpy().astype(np.int64)
        for name, array in ((self.sums, sums), (self.squares, squares)):
            if array.shape != (dim,) or not np.isfinite(array).all():
                raise ValueError(f"array {name!r} has shape {array.shape} (expected ({dim},)) or non-finite values")
        if counts.shape != (self.n_counts,) or (counts < 0).any():
            raise ValueError(f"array {self.counts!r} is {counts.tolist()}; expected [{self.counts_meaning}] >= 0")
        if (squares < 0).any():
            raise ValueError(f"array {self.squares!r} holds negative sums of squares")
        return sums, squares, [int(c) for c in counts]
