"""A server that starts hosting a stage downloads its state from a listed replica, and checks it first.

Why. A joining server has no state of the stage but the run's seeded weights, and a donor's
``state`` reply is only its word: a lying replica used to hand a joiner any finite weights, Adam
moments that blow up its next step, or a version far ahead of the stage's. The joiner now checks
its first download as strictly as it can without a prior state of its own, and tries the listed
replicas one by one (in the order of the records) until one passes:

- Version. At most ``RESYNC_MAX_LEAD`` (256, as for a mending donor and a replicated step) ahead
  of the highest version the stage's *other* listed servers show: the ``round`` their signed
  records announce and the version their ``weights`` reports give now. A donor that is the only
  listed server is held to the round its own record announces (no other word exists); a listed
  server colluding with the donor can raise the cap by announcing a higher round.
- Shapes and values. Params, two Adam moments and an anchor of the stage's shapes, all finite
  (float32 only: the wire decodes nothing else), and Adam moments AdamW can produce,
  ``|exp_avg| <= ADAM_STEP_BOUND * sqrt(exp_avg_sq)`` (node/sharding/averaging.py, Mending).
- Reach. Every coordinate of its params and anchor within ``version`` updates of the run's seeded
  weights, which every replica started from. One update moves a coordinate by at most
  ``lr * (ADAM_STEP_BOUND + wd * M)`` with ``M = max(max|p_0|, ADAM_STEP_BOUND / wd)`` (no decay:
  ``lr * ADAM_STEP_BOUND``): AdamW decays ``p`` by ``lr * wd * p`` and then moves it by at most
  ``7.27 lr``, so ``|p|`` never grows past ``M``, and an averaging round lands between its members'
  params and their anchor (both within reach). This binds a young stage tightly and an old one
  loosely (a stage at version v may be ``v * lr * 8`` away), which is why the vote comes next.
- The vote (node/sharding/agreement.py, what trainers compare). Each try asks the donor for its
  state and every other listed replica for its ``weights`` report at once; the donor's own report
  is computed here from the params it sent, so it cannot report one digest and serve another.
  :func:`~node.sharding.agreement.compare_weights` then finds the reference class (the largest
  group of one version and history, at least 2 and strictly larger than any other). If there is
  one, the donor must be in it and hold the digest a strict majority of it holds: a minority, a
  donor outside the class (lagging, or claiming another history to dodge the comparison) and a
  class split with no majority are all refused. If there is none (the donor is the only replica
  that answered, or every replica holds its own version and history, as several trainers' steps
  in different orders make them), the state is taken on the checks above alone and the log says
  it is unconfirmed.

A refused donor is logged by PeerID with the reason, and the next is tried. A donor the vote did
not place (outside the class, or in one with no majority) may only have answered a step apart from
the others, so once every donor was tried those are tried again, ``JOIN_PASSES`` times in all; a
minority digest or a failed bound is final. If none passes, the
server keeps the run's seeded weights at version 0, as when no replica answers, and says so: it
is then stale (trainers skip it, replicas send it steps only within 256 versions) until mending
copies a replica within reach, or a restart downloads the stage afresh.

What a lie still buys. With a majority of honest replicas agreeing, nothing: the joiner takes the
agreed weights. Without a reference class (a sole replica, two replicas that disagree about their
version or history, or diverged histories), a liar's state is taken if it is within reach of the
seeded weights at the version it claims, at most 256 past what the other listed servers announce;
for an old stage that reach is large. With 2 replicas that report the same version and history and
different weights, both are refused (nothing tells them apart) and the joiner starts from the
seeded weights. A donor's ``applied`` pairs (the recent steps it says it applied) are kept only with
their trainer's valid step proof (hosted.py, ``vouched_pairs``): a donor cannot mark a trainer's
future step done on the joiner, so pre-empt it there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dht import PeerRecord
from node.config import TrainConfig
from node.sharding.agreement import WeightsReport, compare_weights, reported_weights, weights_digest
from node.sharding.averaging import (
    ADAM_STEP_BOUND,
    RESYNC_MAX_LEAD,
    RESYNC_TOLERANCE,
    StageHost,
    max_magnitude,
    state_refusal,
)
from node.sharding.hosted import HostedStage
from node.sharding.messages import STATE_BLOCKS, StageMessageError, StageReply, StageRequest

logger = logging.getLogger(__name__)

JOIN_PASSES = 3  # tries of a donor whose state the others' reports did not place (the stage moved meanwhile)


@dataclass(frozen=True)
class Vote:
    """What the other replicas' weights reports say about a donor's offer (module docstring: The vote)."""

    refusal: str | None = None  # why the offer may not be taken; None: it may
    confirmed: bool = False  # a strict majority of the reference class holds the offer's digest
    settled: bool = True  # False: the offer was not placed in a class, which the stage moving may explain


@dataclass
class StageJoin:
    """What one join of a stage did: whose state it took (if any), and whom it refused and why."""

    donor: str | None = None  # the replica whose state was loaded; None: the seeded weights at version 0
    version: int = 0  # the version loaded
    confirmed: bool = False  # a strict majority of the other replicas' reports held the same weights
    refused: dict[str, str] = field(default_factory=dict)  # donor PeerID -> why its state was not taken


def listed_servers(records: Sequence[PeerRecord], stage: int, run_hash: str, me: str) -> dict[str, PeerRecord]:
    """The records of the other servers of this run that announce ``stage``, in listing order, by PeerID."""
    return {
        r.peer_id: r
        for r in records
        if "server" in r.roles and r.run_hash == run_hash and stage in r.stages and r.peer_id != me
    }


def join_step_bound(train: TrainConfig, seeded: Sequence[torch.Tensor]) -> float:
    """How far one update may move a coordinate anywhere on the way from ``seeded`` (module docstring: Reach)."""
    decay = train.weight_decay
    reach = max(max_magnitude(seeded), ADAM_STEP_BOUND / decay) if decay else 0.0
    return train.inner_lr * (ADAM_STEP_BOUND + decay * reach)


def join_refusal(seeded: Sequence[torch.Tensor], offer: StageReply, version_cap: int, step_bound: float) -> str | None:
    """Why a joiner may not take ``offer`` as the stage's state, before the vote; None if it may.

    Args:
        seeded: the stage's state at version 0 (the run's seeded params, zero moments, anchor = params), on CPU.
        offer: the donor's ``state`` reply.
        version_cap: the highest version the stage's records allow (module docstring: Version).
        step_bound: how far one update may move a coordinate (:func:`join_step_bound`).

    Returns:
        None, or a one-line reason naming the check that failed.
    """
    if not 0 <= offer.version <= version_cap:
        return f"its version {offer.version} is not in [0, {version_cap}], what the stage's records allow"
    reason = state_refusal(offer.tensors, seeded)
    if reason is not None:
        return reason
    count = len(seeded) // STATE_BLOCKS
    allowance = offer.version * step_bound + RESYNC_TOLERANCE
    for block, start in (("params", 0), ("anchor", 3 * count)):
        offered = offer.tensors[start : start + count]
        moved = max_magnitude([t - p for t, p in zip(offered, seeded[:count], strict=True)])
        if moved > allowance:
            return (
                f"its {block} are {moved:.3g} from the run's seeded weights, more than {offer.version} "
                f"updates move them ({allowance:.3g})"
            )
    return None


def vote_refusal(donor: str, offered: WeightsReport, others: Mapping[str, WeightsReport]) -> Vote:
    """Whether the other replicas' weights reports confirm the donor's (module docstring: The vote).

    A donor outside the reference class, or in a class with no majority digest, may have answered a
    moment before or after the others (a step landed in between): that refusal is not settled. A
    minority digest at the class's own version and history is.
    """
    reports = {**others, donor: offered}
    verdict = compare_weights(reports)
    if verdict.version is None:
        return Vote()
    members = sum((r.version, r.history) == (verdict.version, verdict.history) for r in reports.values())
    if donor in verdict.unconfirmed:
        reason = (
            f"its version {offered.version} and history are not those of the {members} replicas that "
            f"agree on version {verdict.version}"
        )
        return Vote(reason, settled=False)
    if not verdict.agreed:
        return Vote(f"the {members} replicas at its version and history disagree on the weights", settled=False)
    if donor in verdict.minority:
        agreeing = members - len(verdict.minority)
        return Vote(f"its weights digest at version {offered.version} is a minority: {agreeing} of {members} agree")
    return Vote(confirmed=True)


async def join_stage(
    host: StageHost, train: TrainConfig, stage: int, hosted: HostedStage, servers: Mapping[str, PeerRecord]
) -> StageJoin:
    """Load ``stage``'s state into ``hosted`` (fresh: seeded weights, version 0) from the first listed
    replica whose offer passes the checks (module docstring); never raises on what replicas send.

    Args:
        host: the joining server (its calls and compute thread are used).
        train: the run's training settings (lr and weight decay bound an update).
        stage: the stage to load.
        hosted: the stage as just built from the run's seed.
        servers: the other listed servers of the stage (:func:`listed_servers`), tried in this order.

    Returns:
        What was loaded, and whom it refused.
    """
    join = StageJoin()
    if not servers:
        logger.info(f"stage {stage}: no other server lists it; starting from the run's seeded weights")
        return join
    seeded = [t.detach().cpu().clone() for t in hosted.state()]
    step_bound = join_step_bound(train, seeded[: len(hosted.params)])
    donors = list(servers)
    for attempt in range(1, JOIN_PASSES + 1):
        unsettled = []
        for donor in donors:
            try:
                reason, settled = await _try_donor(host, stage, hosted, donor, servers, seeded, step_bound, join)
            except Exception as e:  # a reply no check foresaw: never let a donor stop the server from starting
                reason, settled = f"its state could not be checked or loaded: {e!r}", True
            if reason is None:
                join.refused.pop(donor, None)  # refused on an earlier try, before the stage settled
                return join
            join.refused[donor] = reason
            logger.warning(f"stage {stage}: not loading the state of replica {donor} (try {attempt}): {reason}")
            if not settled:
                unsettled.append(donor)
        donors = unsettled
    logger.warning(
        f"stage {stage}: none of the {len(servers)} listed replicas offered a state that passes the join checks; "
        "serving it from the run's seeded weights at version 0 (stale until mending or a restart catches up)"
    )
    return join


async def _try_donor(
    host: StageHost,
    stage: int,
    hosted: HostedStage,
    donor: str,
    servers: Mapping[str, PeerRecord],
    seeded: list[torch.Tensor],
    step_bound: float,
    join: StageJoin,
) -> tuple[str | None, bool]:
    """Ask ``donor`` for its state and the others for their reports; load it if it passes.

    Returns:
        (None, True) once loaded; else why not, and whether that is settled (False: try it again).
    """
    others = [peer for peer in servers if peer != donor]
    calls = [host.call(donor, StageRequest("state", stage))]
    calls += [host.call(peer, StageRequest("weights", stage)) for peer in others]
    offer, *replies = await asyncio.gather(*calls, return_exceptions=True)
    if isinstance(offer, BaseException) or not offer.ok:
        return f"it gave no state ({offer!r})", True
    reports: dict[str, WeightsReport] = {}
    for peer, reply in zip(others, replies, strict=True):
        report = None if isinstance(reply, BaseException) else reported_weights(reply)
        if report is not None:
            reports[peer] = report
    shown = [servers[peer].round for peer in others] + [r.version for r in reports.values()]
    version_cap = max(shown or [servers[donor].round]) + RESYNC_MAX_LEAD
    reason = join_refusal(seeded, offer, version_cap, step_bound)
    if reason is not None:
        return reason, True
    offered = WeightsReport(offer.version, offer.history, weights_digest(offer.tensors[: len(hosted.params)]))
    vote = vote_refusal(donor, offered, reports)
    if vote.refusal is not None:
        return vote.refusal, vote.settled
    try:
        forged = await host.in_compute(hosted.load_state, offer.tensors, offer.version, offer.applied, offer.history)
    except StageMessageError as e:
        return str(e), True
    if forged:
        logger.warning(f"stage {stage}: {forged} of {donor}'s applied steps carry no valid trainer's proof; not kept")
    join.donor, join.version, join.confirmed = donor, offer.version, vote.confirmed
    how = (
        "confirmed by a majority of its replicas' weights" if vote.confirmed else "unconfirmed (no majority to compare)"
    )
    logger.info(f"stage {stage}: loaded version {offer.version} from {donor[:16]}, {how}")
    return None, True
