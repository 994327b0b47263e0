"""Cohorts: peers with similar data, found by each peer alone from the signed records it reads.

The rule (what ``CohortMatcher.cohorts`` computes) must be the same function of the records on
every peer, with no coordinator and no randomness beyond what the records hold:

1. Take the trainer records of the run (one per PeerID, those with ``run_hash`` when given),
   sorted by PeerID, at most ``max_peers`` of them.
2. Normalize each data sketch to L2 norm 1 (the sender's normalization is not trusted); a
   sketch of norm 0 (a peer with no sketch) links to nobody.
3. Link two peers when the cosine distance of their sketches is at most ``distance_threshold``;
   the cohorts are the connected components of these links (single-linkage clustering cut at the
   threshold).
4. A cohort's id is a BLAKE2b digest, keyed by the run id, of its smallest PeerID; its DHT key
   (the averaging key of its groups) is derived from the id.

Why single linkage: it is the only common rule under which a change in the records moves only
the peers it must. A new record can only join one cohort, or merge the cohorts it links (it
never splits one or moves a peer it does not link); a record that disappears can only split the
cohort it bridged. Two peers whose views differ by a few records therefore disagree only about
the cohorts those records touch. Its known weakness is chaining: a peer between two clusters
(or a forged sketch placed there by a Sybil) merges them. The id follows the smallest PeerID, not
a medoid, because a medoid moves whenever a member's sketch does; the smallest PeerID changes
only when a peer with a smaller one joins or that peer leaves (then the whole cohort moves to the
new key together, since every member computes the same id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dht.records import PeerRecord

MAX_COHORT_PEERS = 1024  # most records one clustering reads (the rest, by PeerID, are left out)


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
        distance_threshold: cosine distance (in [0, 2]) up to which two sketches link.
        max_peers: most records read per clustering.
    """

    def __init__(self, run_id: str, distance_threshold: float, max_peers: int = MAX_COHORT_PEERS):
        if not 0 <= distance_threshold <= 2:
            raise ValueError(f"distance_threshold must be in [0, 2] (cosine distance), got {distance_threshold}")
        self.run_id, self.threshold, self.max_peers = run_id, distance_threshold, max_peers

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
        linked = (1.0 - vectors @ vectors.T) <= self.threshold + 1e-9
        linked &= (norms[:, None] > 0) & (norms[None, :] > 0)
        roots = list(range(len(peers)))

        def find(i: int) -> int:
            while roots[i] != i:
                roots[i] = roots[roots[i]]
                i = roots[i]
            return i

        for i, j in zip(*np.nonzero(np.triu(linked, k=1)), strict=True):
            a, b = find(int(i)), find(int(j))
            roots[max(a, b)] = min(a, b)  # the root is the smallest index: the smallest PeerID
        groups: dict[int, list[int]] = {}
        for i in range(len(peers)):
            groups.setdefault(find(i), []).append(i)
        found = [self._cohort([peers[i] for i in members], vectors[members]) for members in groups.values()]
        return sorted(found, key=lambda c: (-len(c), c.cohort_id))

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
