"""D&D 'divide': size-constrained k-means of slide vectors, in pieces a federation can split up.

Centralised: `balanced_kmeans` (scikit-learn KMeans init, then Lloyd iterations whose assignment
step is an exact min-cost assignment with cluster sizes in [min_size, max_size], solved by
`scipy.optimize.milp`; the assignment polytope is totally unimodular, so the LP optimum is integral).
Federated: each site calls `cluster_statistics` (per-cluster sums and counts under the current
centroids, small counts suppressed) and the server calls `update_centroids` on the sites' stats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class ClusteringError(ValueError):
    """The slides cannot be clustered as asked (too few slides for the size constraints)."""


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[n, C] squared Euclidean distances."""
    x, c = np.asarray(x, dtype=np.float64), np.asarray(centroids, dtype=np.float64)
    return np.maximum((x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None], 0.0)


def assign_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid (unconstrained)."""
    return squared_distances(x, centroids).argmin(axis=1)


def size_bounds(n: int, num_clusters: int, min_ratio: float, max_ratio: float, min_size: int) -> tuple[int, int]:
    """(min, max) cluster size for n slides: floor(min_ratio·n/C) ≥ min_size, ceil(max_ratio·n/C), made feasible."""
    if n < num_clusters:
        raise ClusteringError(f"cannot make {num_clusters} clusters from {n} training slide(s)")
    lo = max(min_size, math.floor(min_ratio * n / num_clusters))
    hi = max(math.ceil(max_ratio * n / num_clusters), lo)
    if lo * num_clusters > n:
        if min_size * num_clusters > n:
            raise ClusteringError(
                f"{n} training slides cannot fill {num_clusters} clusters of at least {min_size} (clusters.min-size)"
            )
        lo = n // num_clusters
    hi = max(hi, math.ceil(n / num_clusters))
    return lo, hi


def constrained_assignment(cost: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """Minimum-cost assignment of n rows to C clusters with every cluster size in [min_size, max_size]."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # lazy: see common.metrics
    from scipy.sparse import eye as sparse_eye
    from scipy.sparse import kron

    n, c = cost.shape
    if min_size * c > n or max_size * c < n:
        raise ClusteringError(f"no assignment of {n} slides to {c} clusters of sizes {min_size}..{max_size}")
    one_each = LinearConstraint(kron(sparse_eye(n), np.ones((1, c))), 1, 1)  # x[i, :] sums to 1
    sizes = LinearConstraint(kron(np.ones((1, n)), sparse_eye(c)), min_size, max_size)  # x[:, k] within bounds
    # scale costs so the solver's tolerances don't depend on the embedding scale
    scaled = cost / max(float(np.abs(cost).max()), 1e-12)
    result = milp(c=scaled.reshape(-1), constraints=[one_each, sizes], integrality=np.ones(n * c), bounds=Bounds(0, 1))
    if not result.success or result.x is None:  # pragma: no cover - feasible by construction
        raise ClusteringError(f"size-constrained assignment failed: {result.message}")
    return np.asarray(result.x).reshape(n, c).argmax(axis=1)


def cluster_statistics(
    embeddings: np.ndarray,
    centroids: np.ndarray,
    min_count: int = 0,
    assignment: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster (sums [C, E], counts [C]) of the embeddings; a cluster with fewer than `min_count`
    members reports zero sum and zero count (suppressed). `assignment` defaults to the nearest centroid."""
    x = np.asarray(embeddings, dtype=np.float64)
    c = np.asarray(centroids).shape[0]
    a = assign_nearest(x, centroids) if assignment is None else np.asarray(assignment, dtype=np.int64)
    counts = np.bincount(a, minlength=c).astype(np.int64)
    sums = np.zeros((c, x.shape[1]), dtype=np.float64)
    np.add.at(sums, a, x)
    small = counts < min_count
    sums[small] = 0.0
    counts[small] = 0
    return sums, counts


def clip_rows(x: np.ndarray, norm: float) -> np.ndarray:
    """Each row of `x` scaled down to L2 norm at most `norm`."""
    x = np.asarray(x, dtype=np.float64)
    lengths = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, norm / np.maximum(lengths, 1e-12))


def released_statistics(
    vectors: np.ndarray,
    centroids: np.ndarray,
    assignment: np.ndarray | None,
    min_count: int,
    clip_norm: float | None,
    noise_std: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster (sums, counts) as a site sends them: each vector clipped to `clip_norm` (None: not clipped),
    fresh Gaussian noise of `noise_std` on every reported sum, withheld clusters zero. With the clip, one slide moves
    a sum by at most `clip_norm`, so the difference of two releases shows it only through noise of std
    `noise_std * sqrt(2)` per coordinate."""
    x = np.asarray(vectors, dtype=np.float64) if clip_norm is None else clip_rows(vectors, clip_norm)
    sums, counts = cluster_statistics(x, centroids, min_count=min_count, assignment=assignment)
    if noise_std > 0:
        sums = np.where(counts[:, None] > 0, sums + rng.normal(0.0, noise_std, size=sums.shape), 0.0)
    return sums, counts


def update_centroids(stats: Sequence[tuple[np.ndarray, np.ndarray]], previous: np.ndarray | None = None) -> np.ndarray:
    """New centroids from per-site (sums, counts): total sums / total counts; an empty cluster keeps
    its `previous` centroid (an error without one)."""
    if not stats:
        raise ValueError("no cluster statistics to aggregate")
    sums = np.sum([np.asarray(s, dtype=np.float64) for s, _ in stats], axis=0)
    counts = np.sum([np.asarray(n, dtype=np.float64) for _, n in stats], axis=0)
    empty = counts == 0
    if empty.any() and previous is None:
        raise ClusteringError(
            f"cluster(s) {np.flatnonzero(empty).tolist()} received no slides and have no previous centroid"
        )
    out = np.where(empty[:, None], 0.0, sums / np.maximum(counts, 1)[:, None])
    if empty.any():
        out[empty] = np.asarray(previous, dtype=np.float64)[empty]
    return out


def kmeans_init(x: np.ndarray, num_clusters: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Initial centroids [C, E] from scikit-learn's KMeans (k-means++, `n_init` restarts)."""
    from sklearn.cluster import KMeans  # lazy: see common.metrics

    km = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed).fit(np.asarray(x, dtype=np.float64))
    return km.cluster_centers_


@dataclass
class ClusterResult:
    """Cluster of every slide, the centroids and the size bounds that were enforced."""

    assignment: np.ndarray  # [n]
    centroids: np.ndarray  # [C, E]
    min_size: int
    max_size: int
    iterations: int

    @property
    def sizes(self) -> list[int]:
        """Slides per cluster."""
        return np.bincount(self.assignment, minlength=len(self.centroids)).tolist()


def balanced_kmeans(
    x: np.ndarray,
    num_clusters: int,
    min_size: int,
    max_size: int,
    seed: int = 0,
    iterations: int = 20,
    n_init: int = 10,
    min_count: int = 0,
) -> ClusterResult:
    """Size-constrained k-means: KMeans init, then (constrained assignment, centroid update) until stable."""
    x = np.asarray(x, dtype=np.float64)
    centroids = kmeans_init(x, num_clusters, seed, n_init)
    assignment = constrained_assignment(squared_distances(x, centroids), min_size, max_size)
    done = 0
    for done in range(1, iterations + 1):
        stats = cluster_statistics(x, centroids, min_count=min_count, assignment=assignment)
        centroids = update_centroids([stats], previous=centroids)
        new = constrained_assignment(squared_distances(x, centroids), min_size, max_size)
        if np.array_equal(new, assignment):
            break
        assignment = new
    return ClusterResult(assignment, centroids, min_size, max_size, done)
