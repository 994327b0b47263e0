"""Cohorts: peers with similar data, found by each peer alone from the signed records it reads.

The rule (what ``CohortMatcher.cohorts`` computes) must be the same function of the records on
every peer, with no coordinator and no randomness beyond what the records hold:

1. Take the trainer records of the run (one per PeerID, those with ``run_hash`` when given),
   sorted by PeerID, at most ``max_peers`` of them.
2. Normalize each data sketch to L2 norm 1 (the sender's normalization is not trusted); a
   sketch of norm 0 (a peer with no sketch) is a cohort of its own.
3. Cluster the sketches by cosine distance with the adaptive rule (dht/_linkage.py): build the
   average-linkage tree and cut it at the level where the groups are farthest apart relative to
   their own spread, if that separation is at least ``min_separation`` (default 2: groups at least
   twice as far from each other as their members are from one another), never leaving a cohort
   smaller than ``min_cohort`` (the secure minimum group; smaller leftovers join their nearest
   cohort); then cut again inside each cohort, until no cut stands out. Nothing stands out: one
   cohort. With ``distance_threshold`` set (an operator's override), the old fixed rule applies
   instead: link two peers when their distance is at most the threshold, cohorts are the connected
   components (single linkage).
4. A cohort's id is a BLAKE2b digest, keyed by the run id, of its smallest PeerID; its DHT key
   (the averaging key of its groups) is derived from the id.

Why no absolute threshold: how far apart two sketches are depends on the data, not only on how
different it is. Real text of three domains in one language (plays, software documentation,
licences) has sketches 0.001-0.010 apart within a domain and 0.012-0.05 across, while corpora in
different alphabets are 0.3-0.55 apart; a fixed threshold of 0.1 put the three domains in one
cohort (ARI 0.0). The ratio of between-group to within-group distance is scale-free.

Stability: average linkage moves a group's mean distances by about 1/size when one record joins
or leaves, so a cut that stood out clearly stays where it was; two peers whose views differ by a
record agree unless the separation sat at the edge of ``min_separation``. A Sybil's forged sketch
can pull at most itself into a cohort (a single point is attached to its nearest cohort, never a
cohort of its own), or, placed between two groups, lower their separation: it can merge cohorts,
as under single linkage, but only by making the groups look closer on average, which one record
among many barely does. The id follows the smallest PeerID, not a medoid, because a medoid moves
whenever a member's sketch does; the smallest PeerID changes only when a peer with a smaller one
joins or that peer leaves (then the whole cohort moves to the new key together, since every member
computes the same id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dht._linkage import adaptive_partition
from dht.records import PeerRecord

MAX_COHORT_PEERS = 1024  # most records one clustering reads (the rest, by PeerID, are left out)
MIN_SEPARATION = 2.5  # between-group over within-group mean distance a cut needs (dht/_linkage.py)


@dataclass(frozen=True)
class Cohort:
    """One cohort as a peer computes it."""

    cohort_id: str  # 16 hex digits, stable while the smallest member is
    members: tuple[str, ...]  # PeerIDs, sorted
    distances: tuple[float, ...]  # cosine distance of each member's sketch to the cohort's mean sketch

    def __len__(self) -> int:
        return len(self.members)


class CohortMatcher:
    """Places the trainers of a run in cohorts by their data sketches (the rule in the module docstring).

    Args:
        run_id: the run; keys the cohort ids, so two runs never share a cohort key.
        distance_threshold: None for the adaptive rule; else the fixed rule's cosine distance (in [0, 2]) up
            to which two sketches link.
        max_peers: most records read per clustering.
        min_cohort: the adaptive rule's smallest cohort of sketched peers (the secure minimum group).
        min_separation: the separation (> 1) a cut of the adaptive rule needs.
    """

    def __init__(
        self,
        run_id: str,
        distance_threshold: float | None = None,
        max_peers: int = MAX_COHORT_PEERS,
        min_cohort: int = 3,
        min_separation: float = MIN_SEPARATION,
    ):
        if distance_threshold is not None and not 0 <= distance_threshold <= 2:
            raise ValueError(f"distance_threshold must be in [0, 2] (cosine distance), got {distance_threshold}")
        if min_cohort < 1 or not min_separation > 1:
            raise ValueError(f"min_cohort must be >= 1 and min_separation > 1, got {min_cohort}, {min_separation}")
        self.run_id, self.threshold, self.max_peers = run_id, distance_threshold, max_peers
        self.min_cohort, self.min_separation = min_cohort, min_separation

    def cohorts(self, records: Sequence[PeerRecord], run_hash: str | None = None) -> list[Cohort]:
        """The cohorts of the trainers in ``records``, largest first (ties: by id)."""
        chosen: dict[str, PeerRecord] = {}
        for record in sorted(records, key=lambda r: r.peer_id):
            if "trainer" in record.roles and (run_hash is None or record.run_hash == run_hash):
                chosen.setdefault(record.peer_id, record)
        peers = sorted(chosen)[: self.max_peers]
        if not peers:
            return []
        vectors = np.array([chosen[p].sketch_vector() for p in peers], dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1)
        vectors = np.divide(vectors, norms[:, None], out=np.zeros_like(vectors), where=norms[:, None] > 0)
        if self.threshold is None:
            groups = self._adaptive(vectors, norms > 0)
        else:
            groups = self._single_linkage(vectors, norms > 0, self.threshold)
        found = [self._cohort([peers[i] for i in members], vectors[members]) for members in groups]
        return sorted(found, key=lambda c: (-len(c), c.cohort_id))

    def _adaptive(self, vectors: np.ndarray, sketched: np.ndarray) -> list[list[int]]:
        """The adaptive rule (module docstring, step 3); peers without a sketch are cohorts of their own."""
        index = np.flatnonzero(sketched)
        groups = [[int(i)] for i in np.flatnonzero(~sketched)]
        if len(index):
            distances = np.clip(1.0 - vectors[index] @ vectors[index].T, 0.0, 2.0)
            np.fill_diagonal(distances, 0.0)
            clusters = adaptive_partition(distances, self.min_cohort, self.min_separation)
            groups += [[int(index[i]) for i in cluster] for cluster in clusters]
        return groups

    @staticmethod
    def _single_linkage(vectors: np.ndarray, sketched: np.ndarray, threshold: float) -> list[list[int]]:
        """The fixed rule: connected components of the links at distance <= ``threshold``."""
        linked = (1.0 - vectors @ vectors.T) <= threshold + 1e-9
        linked &= sketched[:, None] & sketched[None, :]
        roots = list(range(len(vectors)))

        def find(i: int) -> int:
            while roots[i] != i:
                roots[i] = roots[roots[i]]
                i = roots[i]
            return i

        for i, j in zip(*np.nonzero(np.triu(linked, k=1)), strict=True):
            a, b = find(int(i)), find(int(j))
            roots[max(a, b)] = min(a, b)  # the root is the smallest index: the smallest PeerID
        groups: dict[int, list[int]] = {}
        for i in range(len(vectors)):
            groups.setdefault(find(i), []).append(i)
        return list(groups.values())

    def cohort_of(self, peer_id: str, records: Sequence[PeerRecord], run_hash: str | None = None) -> Cohort | None:
        """The cohort ``peer_id`` falls in, or None if its record is not among ``records``."""
        return next((c for c in self.cohorts(records, run_hash) if peer_id in c.members), None)

    def cohort_id(self, smallest_member: str) -> str:
        key = self.run_id.encode()[:64]
        return hashlib.blake2b(smallest_member.encode(), digest_size=8, key=key, person=b"zen-cohort").hexdigest()

    def _cohort(self, members: list[str], vectors: np.ndarray) -> Cohort:
        mean = vectors.mean(axis=0)
        norm = np.linalg.norm(mean)
        centroid = mean / norm if norm > 0 else mean
        distances = tuple(round(float(1.0 - v @ centroid), 6) if norm > 0 else 1.0 for v in vectors)
        return Cohort(cohort_id=self.cohort_id(members[0]), members=tuple(members), distances=distances)


def adjusted_rand_index(truth: Sequence[object], found: Sequence[object]) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings of the same items (1: identical partitions)."""
    if len(truth) != len(found):
        raise ValueError(f"labelings differ in length: {len(truth)} != {len(found)}")

    def pairs(count: int) -> float:
        return count * (count - 1) / 2

    table: dict[tuple[object, object], int] = {}
    rows: dict[object, int] = {}
    cols: dict[object, int] = {}
    for a, b in zip(truth, found, strict=True):
        table[a, b] = table.get((a, b), 0) + 1
        rows[a] = rows.get(a, 0) + 1
        cols[b] = cols.get(b, 0) + 1
    index = sum(pairs(n) for n in table.values())
    row_sum, col_sum = sum(pairs(n) for n in rows.values()), sum(pairs(n) for n in cols.values())
    total = pairs(len(truth))
    expected = row_sum * col_sum / total if total else 0.0
    best = (row_sum + col_sum) / 2
    if best == expected:  # both partitions trivial (all singletons or one block): identical iff equal
        return 1.0 if row_sum == col_sum else 0.0
    return (index - expected) / (best - expected)
