"""Average-linkage clustering cut where the data says so: the adaptive cohort rule's arithmetic.

``adaptive_partition`` builds the average-linkage (UPGMA) tree of a distance matrix and scores the
tree's levels: at a level, the *cores* are the clusters of at least ``min_size`` points, and the
level's score is

    separation = (smallest mean distance between two cores) / (largest mean distance within a core)

a ratio, so the rule has no absolute distance in it: it asks whether the data falls into groups
that are several times farther from each other than their members are from one another, whatever
the scale of the distances (sketches of one language differ by a few thousandths, of different
alphabets by tenths). The best-scoring level is cut when its separation reaches ``gap_ratio``;
otherwise everything is one cluster. Points of clusters smaller than ``min_size`` at the chosen
level are attached to the core nearest to them (average linkage), so no cluster is smaller than
``min_size`` and one odd point (an outlier, or a Sybil's forged sketch) neither forms a cohort of
its own nor forces one cohort on everyone.

Why average linkage rather than single: single linkage chains (one point between two groups merges
them), while the mean distance between two groups moves by about 1/size when one point joins or
leaves, so views that differ by a record agree on every cut that stood out clearly. Why within-core
means and not merge heights: they are what "members are close" means, and they are the same numbers
whichever order ties were merged in.

Everything is a deterministic function of the matrix: ties go to the lowest index (``np.argmin``
returns the first), and the matrix is rounded to 1e-9 first so that two machines whose BLAS differ
in the last bits build the same tree.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-6  # within-core spread below this counts as this (identical sketches)
MAX_SCORED_CLUSTERS = 64  # levels of the tree with more clusters than this are not scored


def adaptive_partition(distances: np.ndarray, min_size: int, gap_ratio: float) -> list[list[int]]:
    """Clusters of the points of a symmetric distance matrix (the rule in the module docstring), cut again
    inside each cluster until no cut stands out (three domains where two are close: the first cut may
    separate only the far one).

    Args:
        distances: n x n, symmetric, zero diagonal.
        min_size: the smallest cluster returned (>= 1).
        gap_ratio: the separation a level needs to be cut (> 1).

    Returns:
        The clusters as sorted lists of indices, ordered by their smallest index.
    """
    matrix = np.round(np.asarray(distances, dtype=np.float64), 9)
    parts = _cut_once(matrix, min_size, gap_ratio)
    if len(parts) == 1:
        return parts
    out = []
    for part in parts:
        inner = adaptive_partition(matrix[np.ix_(part, part)], min_size, gap_ratio)
        out += [[part[i] for i in cluster] for cluster in inner]
    return sorted(out, key=lambda v: v[0])


def _cut_once(distances: np.ndarray, min_size: int, gap_ratio: float) -> list[list[int]]:
    """The best-scoring level of the tree if it reaches ``gap_ratio``, else one cluster."""
    n = len(distances)
    if n < 2 * min_size:
        return [list(range(n))]
    matrix = distances.copy()
    np.fill_diagonal(matrix, np.inf)
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    within = np.zeros(n)  # sum of pairwise distances inside each cluster
    best_score, best = gap_ratio, None
    for _ in range(n - 1):
        if len(members) <= MAX_SCORED_CLUSTERS:
            score = _separation(matrix, members, within, min_size)
            if score > best_score or (best is None and score >= best_score):  # ties: the finer level
                best_score, best = score, _assign(matrix, members, min_size)
        flat = int(np.argmin(matrix))
        i, j = sorted(divmod(flat, n))
        a, b = len(members[i]), len(members[j])
        within[i] += within[j] + a * b * matrix[i, j]
        merged = (a * matrix[i] + b * matrix[j]) / (a + b)
        matrix[i, :], matrix[:, i] = merged, merged
        matrix[i, i] = np.inf
        matrix[j, :], matrix[:, j] = np.inf, np.inf
        members[i] += members.pop(j)
    return best if best is not None else [list(range(n))]


def _cores(members: dict[int, list[int]], min_size: int) -> list[int]:
    return [c for c in sorted(members) if len(members[c]) >= min_size]


def _separation(matrix: np.ndarray, members: dict[int, list[int]], within: np.ndarray, min_size: int) -> float:
    """The level's score: min mean distance between cores over max mean distance within one (0: < 2 cores)."""
    cores = _cores(members, min_size)
    if len(cores) < 2:
        return 0.0
    spread = max(within[c] / (len(members[c]) * (len(members[c]) - 1) / 2) for c in cores)
    between = float(matrix[np.ix_(cores, cores)].min())  # the diagonal is inf
    return between / max(spread, _EPS)


def _assign(matrix: np.ndarray, members: dict[int, list[int]], min_size: int) -> list[list[int]]:
    """The level's clusters, each cluster smaller than ``min_size`` joined to its nearest core."""
    cores = _cores(members, min_size)
    out = {c: list(members[c]) for c in cores}
    for c in sorted(members):
        if c not in out:
            nearest = cores[int(np.argmin(matrix[c, cores]))]
            out[nearest] += members[c]
    return sorted((sorted(v) for v in out.values()), key=lambda v: v[0])
