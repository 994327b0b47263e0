"""Group testing against a poisoner that masking hides: smaller groups after a rejection, and exclusion by votes.

Masking hides who sent what, so when a member's held-out loss gate (node/training/gate.py) rejects its
group's mean, nothing in the sum names the culprit, and a poisoner that stays in the group makes every
honest member train alone, round after round (BENCHMARKS.md, benchmarks/integrity_swarm.py: 5% of the
held-out loss at 6 peers). What every honest member does see is which of its groups it rejected and
which it accepted. Declared formation (formation.py) draws fresh groups from a seed nobody chose, so:

1. **Split.** A node that rejected one of its last ``SPLIT_ROUNDS`` group means, in a group holding none of
   the peers it names (a rejection its suspects explain needs no more tests), gathers ``"split": 1`` with its
   next round. A slot in which any declared peer asks for it is cut into groups of ``min_group_size`` (not of
   ``GROUP_TARGET``), the rejecting member leaves its kept group (kept_group.py), and no group formed in
   such a slot is kept (each runs one round, so every peer is drawn again next round): a poisoner then
   spoils one small group a round, the others' means are accepted, and the groups keep mixing. A slot too
   small for two groups forms one and sits the other peers out (formation.py ``split_partition``): they
   train alone that round, and the poisoner is left out of some groups all the same.
2. **Suspects.** Each node keeps its verdicts of the last ``WINDOW`` rounds (``Suspicion``). It names the
   peer that was in more of the groups it rejected than any other peer (a tie names nobody), in at
   least ``MIN_REJECTED`` of them, and not in a group it accepted since. A poisoner that spoils every
   group it is in is in every group an honest node rejects, so no honest peer can be ahead of it: under
   one poisoner, honest nodes do not name each other, whatever it did in its other rounds (one that
   behaves every other round is simply never ahead and never named; its harm is then every other
   round, each rejected). A named peer stays named until it is in a group this node accepts, or for
   ``NAMED_ROUNDS`` (an excluded peer shares no group, so its name holds). Up to ``MAX_SUSPECTS`` are
   gathered with each round (``"suspects": [PeerID, ...]``), and the node logs each one it names.
3. **Exclusion.** A declared peer named by at least ``votes_needed(|V|)`` = max(2, ceil(|V| / 3)) distinct
   *other* declarers of the slot is left out of the slot's partition by every peer (each computes it
   from the same read-once set of commitments, so all agree), and logged by name.

What it gives and what it does not (docs/architecture.md): one poisoner, or colluders fewer than the
votes, cannot exclude an honest peer (its own vote does not count, and one vote is not enough); as
many colluders as the votes can keep an honest peer out of groups (it then trains alone: a denial of
collaboration, never a change to anyone's model). A poisoner that stays within the gate's tolerance
is never rejected and so never named. With fewer than ``2 x min_group_size`` peers naming is slower (a node
needs two rejected groups with different partners of the poisoner) and the peers that sit out train alone.
Exclusion lasts while the votes do: a named peer shares no group with its voters, so their names of it
lapse only after ``NAMED_ROUNDS``; then it is drawn again, and named again if it poisons again.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

WINDOW = 16  # the last rounds whose verdicts count
SPLIT_ROUNDS = 3  # we ask for small groups while one of our last this many verdicts was a rejection
MIN_REJECTED = 2  # rejected groups a peer must have shared with us before we name it
MAX_SUSPECTS = 4  # peers named in one declaration (bounds the gathered data)
NAMED_ROUNDS = 64  # rounds a named peer stays named without being cleared (an excluded peer shares no group with us)
MAX_PEER_ID_CHARS = 64  # a base58 PeerID is about 52


@dataclass(frozen=True)
class Verdict:
    """What this node did with one round's group mean."""

    round: int
    peers: frozenset[str]  # the group's other contributors
    accepted: bool


class Suspicion:
    """This node's verdicts on its groups, and what they make it ask for (see the module docstring).

    Args:
        me: this node's PeerID (never its own suspect).
        window: the last rounds whose verdicts count.
    """

    def __init__(self, me: str, window: int = WINDOW):
        self.me = me
        self._verdicts: deque[Verdict] = deque(maxlen=window)
        self._named: dict[str, int] = {}  # suspect -> the round we named it (kept until cleared or ``NAMED_ROUNDS``)

    def note(self, round_no: int, peers: Iterable[str], accepted: bool) -> None:
        """Record that this node accepted (or rejected) the mean of round ``round_no``'s group of ``peers``."""
        verdict = Verdict(round_no, frozenset(str(peer) for peer in peers) - {self.me}, accepted)
        self._verdicts.append(verdict)
        for peer in list(self._named):
            if (accepted and peer in verdict.peers) or round_no - self._named[peer] > NAMED_ROUNDS:
                del self._named[peer]  # in a group whose mean we accepted: cleared
        culprit = self._culprit()
        if culprit is not None and culprit not in self._named:
            rejected = sum(culprit in v.peers for v in self._verdicts if not v.accepted)
            logger.warning(
                f"round {round_no}: {culprit} was in {rejected} of the groups whose mean we rejected, more than any "
                "other peer, and in no group we accepted since: naming it a suspect (peers named by enough others "
                "are left out of groups)"
            )
            self._named[culprit] = round_no
            while len(self._named) > MAX_SUSPECTS:
                del self._named[min(self._named, key=self._named.__getitem__)]

    def _culprit(self) -> str | None:
        """The one peer the window points at: in more of our rejected groups than any other peer (a tie names
        nobody), in at least ``MIN_REJECTED`` of them, and not in a group we accepted since its last rejection."""
        counts: dict[str, int] = {}
        for verdict in self._verdicts:
            if not verdict.accepted:
                for peer in verdict.peers:
                    counts[peer] = counts.get(peer, 0) + 1
        ranked = sorted(counts.items(), key=lambda item: -item[1])
        if not ranked or ranked[0][1] < MIN_REJECTED or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
            return None
        top = ranked[0][0]
        last = next(v for v in reversed(self._verdicts) if top in v.peers)
        return None if last.accepted else top

    def suspects(self) -> list[str]:
        """The peers we name, in the order we named them (at most ``MAX_SUSPECTS``)."""
        return sorted(self._named, key=self._named.__getitem__)

    def split(self) -> bool:
        """Whether we ask for small groups: one of our last ``SPLIT_ROUNDS`` verdicts rejected a group that held none
        of the peers we name (a rejection our suspects explain needs no more tests)."""
        recent = list(self._verdicts)[-SPLIT_ROUNDS:]
        return any(not verdict.accepted and not verdict.peers & self._named.keys() for verdict in recent)

    def gathered(self) -> dict[str, Any]:
        """What a round gathers for it: ``{"split": 1}`` and ``{"suspects": [...]}`` where they apply, else {}."""
        suspects = self.suspects()
        return {**({"split": 1} if self.split() else {}), **({"suspects": suspects} if suspects else {})}


def asks_split(data: Mapping[str, Any]) -> bool:
    """Whether a peer's gathered data asks for small groups."""
    return data.get("split") == 1


def suspects_of(data: Mapping[str, Any]) -> frozenset[str]:
    """The peers a declarer's gathered data names; empty (and logged) if the list is malformed."""
    named = data.get("suspects", [])
    valid = (
        isinstance(named, list)
        and len(named) <= MAX_SUSPECTS
        and all(isinstance(p, str) and 0 < len(p) <= MAX_PEER_ID_CHARS for p in named)
    )
    if not valid:
        logger.warning("ignored a declaration's suspects: not a list of at most 4 PeerIDs")
        return frozenset()
    return frozenset(named)


def votes_needed(declared: int) -> int:
    """Distinct other declarers that must name a peer to leave it out of a slot of ``declared`` peers."""
    return max(2, math.ceil(declared / 3))


def excluded(named_by: Mapping[str, frozenset[str]]) -> dict[str, int]:
    """The declared peers that enough *other* declarers name ({peer: votes}); ``named_by``: each declarer's
    suspects. Computed from the slot's read-once commitments, so every peer of the slot gets the same set."""
    needed = votes_needed(len(named_by))
    votes: dict[str, int] = {}
    for voter, named in named_by.items():
        for peer in named:
            if peer != voter and peer in named_by:
                votes[peer] = votes.get(peer, 0) + 1
    return {peer: n for peer, n in votes.items() if n >= needed}
