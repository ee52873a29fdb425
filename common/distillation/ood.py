"""Out-of-distribution score of a slide against the training slides, from low-res features (the student's input).

Each slide is summarised by its mean low-res patch feature x [D]. The training slides give a per-feature mean
mu and variance v (population variance over slides), each variance shrunk toward the median variance as if
`PRIOR_SLIDES` pseudo-slides had that variance: v'_j = (n v_j + k median(v)) / (n + k). A slide's score is the
root-mean-square z-score over features, s(x) = sqrt(mean_j (x_j - mu_j)^2 / v'_j) (a diagonal Mahalanobis
distance scaled by 1/sqrt(D); about 1 for a typical training slide).

Why diagonal rather than a full (Ledoit-Wolf) covariance: a federation can pool it exactly from per-site sums,
sums of squares and counts ([D] arrays, 2·D floats per site instead of D² for the outer products; Ledoit-Wolf's
shrinkage intensity needs per-slide fourth-order terms the sums do not carry), and with tens to hundreds of slides
against D = 1280 features a full covariance is rank-deficient and would be mostly shrinkage anyway.

The flag threshold is the `quantile` (default 0.99, linear interpolation) of the validation slides' scores, so it
is chosen on slides the models did not train on. A slide scoring above it is flagged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedslide.common.atomic import write_text_atomic

OOD_FORMAT = "fedslide.ood/1"
OOD_FILE = "ood.json"
PRIOR_SLIDES = 4  # pseudo-slides of the median variance each feature's variance is shrunk with
DEFAULT_QUANTILE = 0.99
_MIN_VAR = 1e-12


def slide_embedding(features: np.ndarray) -> np.ndarray:
    """A slide's summary [D]: the mean of its low-res patch features [N, D] (float64)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"low-res features must be a non-empty [N, D] array, got shape {x.shape}")
    return x.mean(axis=0)


def slide_embeddings(bags: Iterable[np.ndarray]) -> np.ndarray:
    """Summaries [S, D] of several slides' low-res features."""
    rows = [slide_embedding(b) for b in bags]
    if not rows:
        raise ValueError("no slides to summarise")
    return np.stack(rows)


@dataclass
class OODSums:
    """What a site releases: sums [D] and sums of squares [D] of its slides' summaries, and how many slides
    (all zero when withheld: fewer than the suppression floor)."""

    sums: np.ndarray
    squares: np.ndarray
    slides: int

    @property
    def withheld(self) -> bool:
        return self.slides == 0


def ood_sums(embeddings: np.ndarray, min_slides: int = 0) -> OODSums:
    """The release of the slide summaries [S, D]; zero (withheld) when S < `min_slides`, as cluster statistics."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"slide summaries must be [S, D], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[0] < min_slides:
        d = x.shape[1]
        return OODSums(np.zeros(d), np.zeros(d), 0)
    return OODSums(x.sum(axis=0), np.square(x).sum(axis=0), int(x.shape[0]))


def pool_ood_sums(parts: Sequence[OODSums]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean [D], population variance [D], slides) over the parts that were not withheld."""
    counted = [part for part in parts if not part.withheld]
    n = sum(part.slides for part in counted)
    if n == 0:
        raise ValueError(f"no slides to fit OOD statistics on ({len(parts)} part(s), all withheld or empty)")
    shapes = {part.sums.shape for part in counted} | {part.squares.shape for part in counted}
    if len(shapes) != 1:
        raise ValueError(f"OOD sums of different shapes cannot be pooled: {sorted(shapes)}")
    mean = np.sum([part.sums for part in counted], axis=0) / n
    var = np.maximum(np.sum([part.squares for part in counted], axis=0) / n - np.square(mean), 0.0)
    return mean, var, n


@dataclass
class OODStats:
    """The training slides' low-res statistics and the flag threshold chosen on validation slides."""

    mean: np.ndarray  # [D]
    var: np.ndarray  # [D] shrunk variances (> 0)
    slides: int  # training slides the statistics were fitted on
    threshold: float | None = None  # None: no validation slides, scores are reported without a flag
    quantile: float = DEFAULT_QUANTILE
    val_slides: int = 0
    source: str = "centralized"  # "centralized" | "federated"

    @classmethod
    def from_moments(cls, mean: np.ndarray, var: np.ndarray, slides: int, source: str = "centralized") -> "OODStats":
        """Statistics from the raw per-feature mean and population variance of `slides` slides (variances shrunk)."""
        var = np.asarray(var, dtype=np.float64)
        target = float(np.median(var))
        shrunk = (slides * var + PRIOR_SLIDES * target) / (slides + PRIOR_SLIDES)
        return cls(np.asarray(mean, dtype=np.float64), np.maximum(shrunk, _MIN_VAR), int(slides), source=source)

    @classmethod
    def fit(cls, embeddings: np.ndarray) -> "OODStats":
        """Statistics of training slide summaries [S, D] (centralized; equal to pooling per-site sums)."""
        return cls.from_moments(*pool_ood_sums([ood_sums(embeddings)]))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Scores [S] of slide summaries [S, D] (or one summary [D] -> [1])."""
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        if x.shape[1] != self.dim:
            raise ValueError(f"slide summaries have {x.shape[1]} features, the OOD statistics {self.dim}")
        return np.sqrt(np.mean(np.square(x - self.mean) / self.var, axis=1))

    def score(self, features: np.ndarray) -> float:
        """Score of one slide from its low-res patch features [N, D]."""
        return float(self.scores(slide_embedding(features))[0])

    def flagged(self, score: float) -> bool:
        """Whether a score is beyond the threshold (never without one)."""
        return self.threshold is not None and score > self.threshold

    def with_threshold(self, val_embeddings: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> "OODStats":
        """The threshold set to the `quantile` of the validation summaries' scores (none without val slides)."""
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"OOD threshold quantile must be in (0, 1], got {quantile}")
        val = np.asarray(val_embeddings, dtype=np.float64).reshape(-1, self.dim)
        self.quantile, self.val_slides = float(quantile), int(val.shape[0])
        self.threshold = float(np.quantile(self.scores(val), quantile)) if len(val) else None
        return self

    # ---- persistence --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": OOD_FORMAT,
            "score": "rms z-score of the slide's mean low-res feature (diagonal Mahalanobis / sqrt(D))",
            "slides": self.slides,
            "source": self.source,
            "prior_slides": PRIOR_SLIDES,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "val_slides": self.val_slides,
            "mean": [float(v) for v in self.mean],
            "var": [float(v) for v in self.var],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "OOD statistics") -> "OODStats":
        if data.get("format") != OOD_FORMAT:
            raise ValueError(f"{where}: unknown format {data.get('format')!r} (expected {OOD_FORMAT})")
        mean, var = np.asarray(data["mean"], np.float64), np.asarray(data["var"], np.float64)
        if mean.shape != var.shape or mean.ndim != 1 or not (np.isfinite(mean).all() and (var > 0).all()):
            raise ValueError(f"{where}: 'mean' and 'var' must be equal-length finite lists with var > 0")
        threshold = data.get("threshold")
        if threshold is not None and not math.isfinite(float(threshold)):
            raise ValueError(f"{where}: threshold {threshold!r} is not finite")
        return cls(
            mean,
            var,
            int(data["slides"]),
            None if threshold is None else float(threshold),
            float(data.get("quantile", DEFAULT_QUANTILE)),
            int(data.get("val_slides", 0)),
            str(data.get("source", "centralized")),
        )

    def save(self, path: Path | str) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> "OODStats":
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))


def fit_ood(
    train_bags: Iterable[np.ndarray], val_bags: Iterable[np.ndarray], quantile: float = DEFAULT_QUANTILE
) -> OODStats:
    """Centralized: statistics of the training slides' low-res features, threshold on the validation slides'."""
    stats = OODStats.fit(slide_embeddings(train_bags))
    val = [slide_embedding(b) for b in val_bags]
    return stats.with_threshold(np.stack(val) if val else np.zeros((0, stats.dim)), quantile)
