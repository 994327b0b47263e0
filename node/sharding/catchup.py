"""A sharded trainer that joins late takes its parts from the trainers ahead of it.

The trainers' parts (embeddings, first blocks, head) average as changes against an anchor the
group shares (node/sharding/fronts.py), so a trainer that starts from the seeded parts while the
others are rounds ahead would average its changes against its own anchor forever and never hold
their parts. So, once listed and before its first step, a trainer without a checkpoint to resume:

1. picks up to ``MAX_DONORS`` trainers of the run whose signed records show at least one round done
   (with ``[run.cohorts]``: of its own cohort, so cohort parts come from its cohort), the most
   advanced first;
2. fetches from each its parameters and their anchors (``FrontAverager.served``, kept after every
   round under the ``parts`` handler of node/training/lineage.py's ``LineageServer``: chunked,
   bounded, checked for shape and finiteness);
3. takes their coordinate-wise median (``combine``; members of one group hold the same bits, so with
   honest donors it is their state exactly, and one lying donor of three cannot pull it out of the
   honest range) for its averaged parts; its local parts (cohorts' ``local_patterns``) stay its own;
4. continues from the donors' round (the round is what trainers meet at): its step jumps to the
   first step of the most advanced donor's current round.

If no donor answers in time, it starts from the seeded parts as before, and says so.

A trainer whose records place it in another cohort (its data changed) does the same for its cohort
parts only (``join_cohort``): the median of up to 3 new co-members' parts and anchors, its own change
since its anchor kept on top, so the new cohort's next ring averages it with theirs; global and local
parts stay its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence

import torch

from dht import PeerRecord
from node.sharding.fronts import FrontAverager
from node.training.lineage import LineageServer, combine

logger = logging.getLogger(__name__)

MAX_DONORS = 3
SLOT = 0  # the LineageServer key a trainer's current parts are served under


def choose_donors(
    me: str, records: Sequence[PeerRecord], run_hash: str, inner_steps: int, members: Collection[str] | None
) -> tuple[list[str], int]:
    """Up to ``MAX_DONORS`` trainers of the run at least a round ahead (of ``members`` if given), most advanced
    first, and the first step of the most advanced one's current round (0: none)."""
    ahead = [
        r
        for r in records
        if "trainer" in r.roles
        and r.run_hash == run_hash
        and r.peer_id != me
        and r.round >= inner_steps
        and (members is None or r.peer_id in members)
    ]
    chosen = sorted(ahead, key=lambda r: (-r.round, r.peer_id))[:MAX_DONORS]
    step = (chosen[0].round // inner_steps) * inner_steps if chosen else 0
    return [r.peer_id for r in chosen], step


def catch_up(
    server: LineageServer,
    fronts: FrontAverager,
    me: str,
    records: Sequence[PeerRecord],
    run_hash: str,
    inner_steps: int,
    timeout: float,
) -> int:
    """Take the averaged parts of the trainers ahead (module docstring); the step to continue from (0: none).
    ``timeout``: seconds for all the fetches together."""
    if not choose_donors(me, records, run_hash, inner_steps, None)[0]:
        return 0  # nobody is ahead (trainers that start together): nothing to take
    fronts.prepare(0)  # with cohorts: place us, so the donors are of our cohort
    donors, step = choose_donors(me, records, run_hash, inner_steps, fronts.cohort_members)
    if not donors:
        logger.warning("no trainer of our cohort is ahead: starting from the seeded parts")
        return 0
    entries = _fetch_parts(server, fronts, donors, timeout)
    if not entries:
        logger.warning(f"no trainer ahead served its parts ({len(donors)} asked): starting from the seeded parts")
        return 0
    fronts.adopt(combine(entries, "median"))
    logger.info(
        f"joined late: took the averaged parts of {len(entries)} trainer(s) ahead (their median); "
        f"continuing at step {step} (round {step // inner_steps})"
    )
    return step


def join_cohort(
    server: LineageServer, fronts: FrontAverager, me: str, records: Sequence[PeerRecord], run_hash: str, timeout: float
) -> bool:
    """After a move (``fronts.moved()``): take the new cohort's cohort parts (module docstring); whether we did."""
    donors, _ = choose_donors(me, records, run_hash, 1, fronts.cohort_members)  # any member that trained
    entries = _fetch_parts(server, fronts, donors, timeout)
    if not entries:
        logger.warning(f"moved to cohort {fronts.cohort_id} but none of its members served its parts: keeping ours")
        return False
    fronts.take_cohort(combine(entries, "median"))
    logger.info(f"moved to cohort {fronts.cohort_id}: took its cohort parts from {len(entries)} member(s)")
    return True


def _fetch_parts(
    server: LineageServer, fronts: FrontAverager, donors: Sequence[str], timeout: float
) -> list[list[torch.Tensor]]:
    """The parts and anchors each donor serves (those that answer within ``timeout`` s, shared by all)."""
    templates, entries = fronts.served(), []
    deadline = time.monotonic() + timeout  # shared by the donors (a donor mid-round serves once it averaged)
    for donor in donors:
        try:
            entries.append(server.fetch(donor, SLOT, templates, max(1.0, deadline - time.monotonic())))
        except ValueError as e:
            logger.warning(f"fetching a trainer's parts: {e}")
    return entries
