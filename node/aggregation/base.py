"""The aggregation interface: one way for every round mode to merge pseudo-gradients with peers.

``Aggregator.aggregate`` takes this node's update tensors and its weight (samples) for an outer
round and replaces the tensors, in place, with the weighted mean over the group it joined.
Implementations: ``SecureAggregator`` (secure.py, the default: the masked all-reduce, no peer sees
another's update), ``PlainAggregator`` (plain.py: hivemind's float butterfly all-reduce, for
comparison), ``HierarchicalAggregator`` (hierarchy.py: cohort and global parameters).

Each round the trainer calls ``prepare_round`` from its main thread (hivemind starts an averager's
process from the main thread only), then ``aggregate`` from a background thread. ``cohort_id``
names the cohort the aggregator averages in (None outside ``[run.cohorts]``).

Round alignment: a node sets its matchmaking group bits to its round number before each
step, so only peers at the same round meet (hivemind forms groups per key). Every member
gathers its round into the group; a mismatch is an error, not an average of unrelated deltas.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ROUND_BITS = 16  # the round number modulo 2**16 picks the matchmaking key


StateDigest = Callable[[Sequence[int] | None], str]  # the lineage digest of some parameters' global state


class AggregationError(Exception):
    """A round's aggregation produced an inconsistent result and must not be applied."""


class AloneThisRound(AggregationError):
    """The round ends here without a mean, and no peer will be ahead of us for it: we sat it out (a split slot
    too small for two groups, node/secagg/suspicion.py), or every member refused the group's sum (bounds.py).
    The node trains alone this round, at once, without waiting for a peer ahead."""


@dataclass(frozen=True)
class AggregationResult:
    """What a successful aggregation reports."""

    round: int  # the outer round that was averaged
    group_size: int  # peers whose updates are in the mean, self included
    peers: tuple[str, ...]  # their PeerIDs
    group_id: str = ""  # secure: the group's id this round (hex)
    group_round: int = 0  # secure: rounds the group ran before this one without matchmaking (0: just matched)
    key_fingerprints: tuple[str, ...] = ()  # secure: each contributor's round keys as received, in ``peers`` order
    # secure: the group's consistency certificate, encoded (node/ledger/certificate.py: t+ signatures on U, checkable
    # by anyone); b"" for plain aggregation and for a round that combined several groups (cohorts)
    certificate: bytes = b""
    # what each ring of the round says about its members' lineages (node/training/lineage.py): one for a flat
    # aggregator, the cohort ring's and the cross-cohort ring's with cohorts
    lineages: tuple[Lineage, ...] = ()


@dataclass(frozen=True)
class Lineage:
    """The lineages one ring's members declared: the digest of the global state each averaged from."""

    indices: tuple[int, ...] | None  # the parameters the ring carried (model order); None: all of them
    peers: tuple[str, ...]  # the ring's contributors
    states: tuple[str, ...]  # each one's declared digest, in ``peers`` order ("" where it declared none)

    def distinct(self) -> int:
        """How many lineages the ring held; 0 when a member declared none (a kept group's later rounds)."""
        return 0 if "" in self.states or len(self.states) != len(self.peers) else len(set(self.states))


class Aggregator(ABC):
    """Merge one round's update with peers."""

    def prepare_round(self, round_no: int) -> None:  # noqa: B027 (a hook: most aggregators need nothing)
        """Ready ``round_no`` before its ``aggregate``: called from the main thread, with no aggregation
        in flight. The default does nothing."""

    def declare_state(self, digest_of: StateDigest) -> None:  # noqa: B027 (a hook: most aggregators ignore it)
        """How to name the lineage of the global state the next ``aggregate`` averages from: ``digest_of(indices)``
        (None: every parameter) is gathered with it (node/training/lineage.py)."""

    def declare_cohort(self, cohort_id: str, cohorts: int) -> None:  # noqa: B027 (a hook: most aggregators ignore it)
        """Mark this aggregator as a cross-cohort ring: its next rounds gather this node's cohort and the number of
        cohorts it counts, so that declared formation waits for a slot that spans two cohorts
        (node/secagg/formation.py, ``spans``)."""

    @property
    def cohort_id(self) -> str | None:
        """The cohort this node averages in since the last ``prepare_round``; None without cohorts."""
        return None

    @property
    def cohort_members(self) -> tuple[str, ...] | None:
        """The PeerIDs of that cohort (the donors a joiner downloads from); None without cohorts."""
        return None

    def verdict(self, result: AggregationResult, accepted: bool) -> None:  # noqa: B027 (a hook)
        """What this node did with ``result``'s mean (its gate accepted or rejected it): the secure flat aggregator
        asks for small groups after a rejection and names the peer its rejections point at
        (node/secagg/suspicion.py). The default does nothing."""

    def watch_ahead(self, hopeless: Callable[[int], bool]) -> None:  # noqa: B027 (a hook)
        """``hopeless(r)``: whether no group of round ``r`` can still form with this node (other peers finished
        ``r`` already, or none is left). A flat aggregator that has looked for a group of ``r`` in vain for a
        while and sees that stops looking (it missed their slot: the trainer then downloads their state, or
        trains alone if nobody is left) instead of waiting out its timeout. The default (the hierarchical
        aggregator's) ignores it."""

    def moved(self) -> bool:
        """Whether a ``prepare_round`` moved this node to another cohort since the last call (reset by the call)."""
        return False

    @abstractmethod
    def aggregate(self, round_no: int, tensors: Sequence[torch.Tensor], weight: float) -> AggregationResult | None:
        """Replace ``tensors`` in place with the weighted mean over a group of peers at ``round_no``.

        Args:
            round_no: the outer round this update belongs to.
            tensors: this node's update; overwritten with the group's mean on success.
            weight: this node's weight in the mean (its sample count for the round), > 0.

        Returns:
            The group's description, or None when no group formed in time (``tensors`` unchanged).

        Raises:
            AggregationError: the group's result is inconsistent; ``tensors`` are unchanged.
        """

    @abstractmethod
    def shutdown(self) -> None:
        """Stop background work and release network handlers."""

    @property
    def residual(self) -> torch.Tensor | None:
        """After a successful ``aggregate``: what of the update the group's sum left out (flat), or None
        when it took all of it (no compression)."""
        return None


def round_group_bits(round_no: int) -> str:
    return format(round_no % (1 << ROUND_BITS), f"0{ROUND_BITS}b")
