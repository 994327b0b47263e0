"""Averaging a stage's parameters among the servers that host it, every ``sharding.average_period`` seconds.

Why. A committed step is copied to every replica of its stage (``replicate``), but copies keep
replicas equal only approximately: with several trainers, steps land in different orders on
different replicas (AdamW steps do not commute), and a replica that missed a copy is skipped by
trainers, never repaired. So the servers of a stage meet periodically and leave with the same
bits.

A round (all servers of a stage start it at the same wall-clock multiple of the period):

1. Drain. Trainer calls to the stage are refused with ``averaging`` (trainers wait a second and
   retry), while steps other replicas committed just before are still accepted; the round waits
   a third of ``request_timeout`` (the longest a replication may take) plus a margin, and for this
   server's own commits in progress to finish replicating.
2. Snapshot. Replicated steps are now held until the round ends; the drift ``anchor - params``
   is taken (node/sharding/hosted.py: the anchor is the stage as the last round left it, identical
   on every member of that round).
3. Aggregate (3 or more servers listed). The drift is averaged (weight 1 per server) through
   ``node.aggregation``'s secure aggregator (the masked all-reduce, groups of >= 3) under the run
   id ``<run_id>-stage<k>``, so servers of different stages never meet, with the round number
   set to a 48-bit hash of (stage, version, anchor digest): only replicas that hold the same
   anchor and the same number of updates meet, since averaging drifts from different anchors
   would mean nothing. Secure is used whatever the run's aggregation mode: its fixed-point sum
   is decoded with the same float64 operations on every member, so members get the same bits,
   which hivemind's float averager (local + (mean - local)) does not give.
4. Apply. Every member sets ``params = anchor - mean`` (the same float32 operations on the same
   bits: bit-identical), takes the result as its new anchor and adds one to its version (the
   same on all members; it never goes down). Adam's moments stay each replica's own: they came
   from the same gradients, only in another order.
5. Resync. A server that formed no group (a missed step, a late start, a lost peer), and every
   server of a stage with exactly 2 servers, copies the state (params, moments, anchor, version)
   of the listed replica with the highest version, ties to the smallest PeerID, that passes the
   checks of "Mending" below (one that fails is logged and the next is tried); if that is itself,
   it keeps its state and the others copy it. Two servers do not average: a secure sum of two
   reveals both inputs, and a plain mean is not needed for privacy either (a stage's weights are
   public: every server answers ``state`` with them for trainers' spot-checks), but copying one
   replica is what makes the two bit-identical; their difference is step order only.

Mending. A donor's ``state`` reply is its own word: a replica that reported a huge version with
arbitrary finite weights used to be copied by every honest replica of its stage. A state is now
copied only if updates could have produced it from ours, so one lying replica moves an honest one
no further than the updates it claims:

- its version is at most ``RESYNC_MAX_LEAD`` (256, as for a replicated step, server.py) ahead of
  ours; a replica further behind cannot mend by copying (it takes no replicated step either): it
  stays stale, trainers skip it, and a restart downloads the stage afresh;
- every coordinate of its params lies within ``(v_donor - v_synced) + (v_ours - v_synced)``
  updates of ours, where ``v_synced`` is the version at which we last held our peers' bits
  (``HostedStage.synced_version``) and one update moves a coordinate by at most
  ``lr * (ADAM_STEP_BOUND + weight_decay * max|p|)``: AdamW's step is ``lr * m_hat / (sqrt(v_hat) +
  eps)``, and ``|m| <= 0.1 / sqrt(0.001) / sqrt(1 - 0.81 / 0.999) * sqrt(v) = 7.27 sqrt(v)`` for
  any gradients (Cauchy-Schwarz over the moments' sums; the bias corrections only shrink it), and
  an averaging round lands within its members' updates. Its anchor is ours or within the same
  distance (a far anchor would pull the next round's params to it);
- its Adam moments are ones AdamW could have made, ``|exp_avg| <= ADAM_STEP_BOUND * sqrt(exp_avg_sq)``
  (larger ones would make our next step as large as they like).

An honest donor that shared our bits at ``v_synced`` always passes. One that did not (it last
synced with another replica) may be refused until both have made enough updates to cover their
difference; meanwhile the replicas stay apart and trainers' weights checks tell them apart. What a
lying replica can still do, per round: move each coordinate of the replicas that copy it by up to
the bound above (at most ``RESYNC_MAX_LEAD`` plus twice our updates since the last sync, about as
far as a trainer committing that many steps of gradients of its choice could; with the default lr
of 3e-3 and a full lead, 6 per coordinate: bounded, not harmless), raise their
version by up to 256, and serve large second moments that slow their next steps; never copy in
non-finite weights, a far-off state, a runaway version or moments that blow up a step. With
exactly 2 servers a liar is half the stage: nothing tells the two apart, and the bound is the
whole defence.

A server that is alone on its stage only re-anchors. Drift is clipped to ``DRIFT_BOUND`` per
coordinate (one period of AdamW moves a coordinate by about ``period_steps * lr``); the 32-bit
ring then resolves about ``DRIFT_BOUND / 2**29``, below float32's rounding of weights near 1.

The averager reaches its server only through :class:`StageHost` (the stage server implements it),
and a stage's averaging gate only through its HostedStage's methods; it never imports the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from hivemind.utils import get_dht_time

from node.aggregation.base import AggregationError, AggregationResult, Aggregator
from node.aggregation.factory import make_aggregator
from node.config import AggregationConfig, RunConfig
from node.sharding.hosted import HostedStage
from node.sharding.messages import STATE_BLOCKS, StageMessageError, StageReply, StageRequest

if TYPE_CHECKING:
    import hivemind

    from dht import NodeIdentity

logger = logging.getLogger(__name__)

DRIFT_BOUND = 8.0  # per-coordinate clip of one period's drift in the fixed-point ring
DRAIN_MARGIN_SECONDS = 0.5  # on top of the longest replication, before the snapshot
KEY_BITS = 48  # bits of the round number that names (stage, version, anchor)
RESYNC_MAX_LEAD = 256  # versions a resync donor may be ahead of us (module docstring: Mending)
ADAM_STEP_BOUND = 8.0  # one AdamW step per coordinate, in units of lr (7.27 at betas 0.9, 0.999; Mending)
RESYNC_TOLERANCE = 1e-5  # float32 rounding allowed on top of a donor's bound

T = TypeVar("T")


class StageHost(Protocol):
    """What an averager needs from the server it runs in (node/sharding/server.py's StageServer)."""

    @property
    def identity(self) -> NodeIdentity:
        """The server's keys: its PeerID names it among a stage's replicas and in secure rounds."""
        ...

    @property
    def dht(self) -> hivemind.DHT:
        """The swarm the stages' aggregators meet on."""
        ...

    def hosted_stage(self, stage: int) -> HostedStage | None:
        """The stage as the server holds it, None if it hosts it no more."""
        ...

    def hosted_stages(self) -> list[int]:
        """The stages the server hosts now."""
        ...

    async def stage_replicas(self, stage: int) -> list[str]:
        """PeerIDs of the listed servers of ``stage`` (this one included)."""
        ...

    async def in_compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the server's compute thread (where every change to a hosted stage runs)."""
        ...

    async def call(self, peer: str, request: StageRequest, timeout: float | None = None) -> StageReply:
        """One stage call to another server."""
        ...


def round_key(stage: int, version: int, anchor_digest: bytes) -> int:
    """The round number replicas of ``stage`` at ``version`` with this anchor average under."""
    data = anchor_digest + stage.to_bytes(2, "big") + version.to_bytes(8, "big")
    return int.from_bytes(hashlib.blake2b(data, digest_size=KEY_BITS // 8).digest(), "big")


def max_magnitude(tensors: Sequence[torch.Tensor]) -> float:
    """The largest absolute value in ``tensors`` (0.0 for none)."""
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def state_refusal(tensors: Sequence[torch.Tensor], template: Sequence[torch.Tensor]) -> str | None:
    """Why ``tensors`` are no state of the stage AdamW could make (module docstring: Mending); None if they are.

    Args:
        tensors: an offered state: params, two Adam moments, anchor.
        template: any state of the stage (``HostedStage.state()``), for the count and shapes.

    Returns:
        None, or a one-line reason: wrong count or shapes, a value that is not finite, or Adam moments
        AdamW cannot produce.
    """
    count = len(template) // STATE_BLOCKS
    if len(tensors) != len(template) or any(
        t.shape != m.shape or not torch.isfinite(t).all() for t, m in zip(tensors, template, strict=True)
    ):
        return "its state is not finite params, two Adam moments and an anchor of the stage's shapes"
    for avg, avg_sq in zip(tensors[count : 2 * count], tensors[2 * count : 3 * count], strict=True):
        if (avg_sq < 0).any() or (avg.abs() > ADAM_STEP_BOUND * avg_sq.sqrt()).any():
            return f"its Adam moments are none AdamW makes (|exp_avg| > {ADAM_STEP_BOUND:g} * sqrt(exp_avg_sq))"
    return None


def donor_refusal(
    mine: Sequence[torch.Tensor], version: int, synced_version: int, offer: StageReply, step_bound: float
) -> str | None:
    """Why a resync donor's state may not be copied (module docstring: Mending); None if it may.

    Args:
        mine: our state as ``HostedStage.state()`` lists it (params, two Adam moments, anchor), on CPU.
        version: our version.
        synced_version: the version at which we last held our peers' bits.
        offer: the donor's ``state`` reply (at a version not below ours).
        step_bound: how far one update may move a coordinate.

    Returns:
        None, or a one-line reason naming the check that failed.
    """
    lead = offer.version - version
    if lead > RESYNC_MAX_LEAD:
        return f"its version is {lead} ahead of ours, more than the {RESYNC_MAX_LEAD} a resync may catch up"
    reason = state_refusal(offer.tensors, mine)
    if reason is not None:
        return reason
    tensors = offer.tensors
    count = len(mine) // STATE_BLOCKS
    updates = (offer.version - synced_version) + (version - synced_version)
    allowance = updates * step_bound + RESYNC_TOLERANCE
    params = mine[:count]
    moved = max_magnitude([(t - p) for t, p in zip(tensors[:count], params, strict=True)])
    if moved > allowance:
        return f"its params are {moved:.3g} from ours, more than {updates} updates move them ({allowance:.3g})"
    anchor = tensors[3 * count :]
    if not all(torch.equal(a, b) for a, b in zip(anchor, mine[3 * count :], strict=True)):
        off = max_magnitude([(a - p) for a, p in zip(anchor, params, strict=True)])
        if off > allowance:
            return f"its anchor is {off:.3g} from our params, more than {updates} updates move them ({allowance:.3g})"
    return None


class StageAverager:
    """The periodic averaging rounds of one stage server's hosted stages (runs on the server's event loop).

    Args:
        host: the stage server; its hosted stages, identity, DHT, compute thread and calls are used.
        run: the run's configuration (its sharding and aggregation settings).
        stop_event: the server's stop event; once set, a pending round gives up.
    """

    def __init__(self, host: StageHost, run: RunConfig, stop_event: threading.Event):
        self.host = host
        self.run = run
        self.stop_event = stop_event
        self.stats: Counter[str] = Counter()  # round outcomes: averaged, resynced, kept, alone, gone
        self.last: dict[int, AggregationResult] = {}  # each stage's last round that averaged
        self.donors_refused: Counter[str] = Counter()  # resync donors whose state failed the Mending checks
        self._aggregators: dict[int, Aggregator] = {}
        self._blocking = ThreadPoolExecutor(max_workers=64, thread_name_prefix="zen-stage-averaging")
        self._rounds = 0
        self._done = threading.Condition()

    async def run_periodically(self) -> None:
        """Average every hosted stage at each multiple of the period (on DHT time), until cancelled."""
        period = self.run.sharding.average_period
        while True:
            await asyncio.sleep(period - get_dht_time() % period)
            await asyncio.gather(*(self.average(stage) for stage in self.host.hosted_stages()))
            with self._done:
                self._rounds += 1
                self._done.notify_all()

    def wait_for_rounds(self, count: int, timeout: float) -> bool:
        """Block until ``count`` periods' rounds have finished here; False on timeout."""
        with self._done:
            return self._done.wait_for(lambda: self._rounds >= count, timeout)

    @property
    def rounds(self) -> int:
        """Periods whose rounds have finished on this server."""
        return self._rounds

    async def average(self, stage: int) -> str:
        """One round for ``stage``; returns its outcome (averaged, resynced, kept, alone or gone)."""
        hosted = self.host.hosted_stage(stage)
        me = self.host.identity.peer_id
        if hosted is None:
            outcome = "gone"
        elif not (others := sorted(p for p in await self.host.stage_replicas(stage) if p != me)):
            await self.host.in_compute(hosted.reanchor)
            outcome = "alone"
        else:
            with hosted.averaging_round():  # through the resync too: nothing may land on params about to be replaced
                averaged = await self._round(stage, hosted, 1 + len(others))
                outcome = "averaged" if averaged else await self._resync(stage, hosted, others)
        self.stats[outcome] += 1
        return outcome

    async def _round(self, stage: int, hosted: HostedStage, servers: int) -> bool:
        await asyncio.sleep(self.run.sharding.request_timeout / 3 + DRAIN_MARGIN_SECONDS)
        await hosted.commits_settled()
        hosted.freeze()
        if servers < 3:
            logger.info(
                f"stage {stage}: 2 servers listed, too few for a secure round; the one behind (or with the larger "
                "PeerID) copies the other's state (a stage's weights are public: servers publish them for spot-checks)"
            )
            return False
        drift, version = await self.host.in_compute(hosted.drift)
        key = round_key(stage, version, hosted.anchor_digest)
        aggregator = self._aggregators.get(stage)
        if aggregator is None:
            logger.warning(f"stage {stage}: no aggregator was started for it; not averaging")
            return False
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._blocking, aggregator.aggregate, key, drift, 1.0)
        except AggregationError as e:
            logger.warning(f"stage {stage}: averaging round at version {version} discarded: {e}")
            return False
        if result is None:
            logger.warning(f"stage {stage}: no averaging group formed at version {version} ({servers} servers listed)")
            return False
        await self.host.in_compute(hosted.apply_mean_drift, drift)
        self.last[stage] = result
        others = result.group_size - 1
        logger.info(f"stage {stage}: averaged securely with {others} other servers; version {hosted.version}")
        return True

    def prepare(self, stage: int, templates: Sequence[torch.Tensor]) -> None:
        """Start the secure aggregator of ``stage``'s rounds.

        Call from the main thread (hivemind's averager sets signal handlers as it starts).
        """
        if stage in self._aggregators:
            return
        base = self.run.aggregation
        config = AggregationConfig(
            mode="secure",
            min_group_size=3,
            matchmaking_time=base.matchmaking_time,
            timeout=base.timeout,
            clip_bound=DRIFT_BOUND,
            message_timeout=base.message_timeout,
        )
        self._aggregators[stage] = make_aggregator(
            self.host.dht,
            f"{self.run.run_id}-stage{stage}",
            [t.detach().float().cpu() for t in templates],
            config,
            identity=self.host.identity,
            weight_bound=1.0,
            stop_event=self.stop_event,
        )

    def forget(self, stage: int) -> None:
        """Stop the aggregator of a stage this server no longer hosts (main thread)."""
        aggregator = self._aggregators.pop(stage, None)
        if aggregator is not None:
            aggregator.shutdown()

    async def _resync(self, stage: int, hosted: HostedStage, others: list[str]) -> str:
        """Copy the state of the listed replica with the highest version (ties: smallest PeerID) that passes
        the Mending checks (module docstring), unless that is us."""
        replies = await asyncio.gather(
            *(self.host.call(peer, StageRequest("state", stage)) for peer in others), return_exceptions=True
        )
        answered = [
            (-reply.version, peer, reply)
            for peer, reply in zip(others, replies, strict=True)
            if not isinstance(reply, BaseException) and reply.ok
        ]
        ours = (-hosted.version, self.host.identity.peer_id)
        offers = sorted(offer for offer in answered if offer[:2] < ours)
        if not offers:
            if answered:
                await self.host.in_compute(hosted.mark_synced)  # the replicas that answered copy us
            return "kept"
        for _, donor, offer in offers:
            outcome = await self._copy(stage, hosted, donor, offer)
            if outcome:
                return outcome
        logger.warning(f"stage {stage}: no listed replica offered a state we may copy; keeping ours")
        return "kept"

    async def _copy(self, stage: int, hosted: HostedStage, donor: str, offer: StageReply) -> str | None:
        """Copy ``offer`` unless it fails the Mending checks; None when it is refused (logged)."""
        mine = await self.host.in_compute(hosted.state)
        if offer.version == hosted.version and len(mine) == len(offer.tensors):
            if all(torch.equal(a.detach().cpu(), b.cpu()) for a, b in zip(mine, offer.tensors, strict=True)):
                await self.host.in_compute(hosted.mark_synced)
                return "kept"  # the donor already holds our bits (it may have copied them from us this round)
        train = self.run.train
        step_bound = train.inner_lr * (ADAM_STEP_BOUND + train.weight_decay * max_magnitude(hosted.params))
        reason = donor_refusal(
            [t.detach().cpu() for t in mine], hosted.version, hosted.synced_version, offer, step_bound
        )
        if reason is None:
            try:
                forged = await self.host.in_compute(
                    hosted.load_state, offer.tensors, offer.version, offer.applied, offer.history
                )
                if forged:
                    logger.warning(f"stage {stage}: {forged} of {donor}'s applied steps carry no valid proof; not kept")
            except StageMessageError as e:
                reason = str(e)
        if reason is not None:
            self.donors_refused[donor] += 1
            logger.warning(
                f"stage {stage}: not copying the state of replica {donor} (version {offer.version}, ours "
                f"{hosted.version}): {reason}"
            )
            return None
        logger.info(f"stage {stage}: copied version {offer.version} from {donor[:16]} after a round without a group")
        return "resynced"

    def shutdown(self) -> None:
        """Stop pending rounds (the stop event must be set) and the stages' averagers."""
        self._blocking.shutdown(wait=True, cancel_futures=True)
        for aggregator in self._aggregators.values():
            aggregator.shutdown()
        self._aggregators.clear()
