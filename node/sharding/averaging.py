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
   of the listed replica with the highest version, ties to the smallest PeerID; if that is
   itself, it keeps its state and the others copy it. Two servers do not average: a secure sum
   of two reveals both inputs, and a plain mean is not needed for privacy either (a stage's
   weights are public: every server answers ``state`` with them for trainers' spot-checks), but
   copying one replica is what makes the two bit-identical; their difference is step order only.

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
from node.sharding.messages import StageMessageError, StageReply, StageRequest

if TYPE_CHECKING:
    import hivemind

    from dht import NodeIdentity

logger = logging.getLogger(__name__)

DRIFT_BOUND = 8.0  # per-coordinate clip of one period's drift in the fixed-point ring
DRAIN_MARGIN_SECONDS = 0.5  # on top of the longest replication, before the snapshot
KEY_BITS = 48  # bits of the round number that names (stage, version, anchor)

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
        """Copy the state of the listed replica with the highest version (ties: smallest PeerID), unless that is us."""
        replies = await asyncio.gather(
            *(self.host.call(peer, StageRequest("state", stage)) for peer in others), return_exceptions=True
        )
        candidates: list[tuple[int, str, StageReply | None]] = [(hosted.version, self.host.identity.peer_id, None)]
        for peer, reply in zip(others, replies, strict=True):
            if not isinstance(reply, BaseException) and reply.ok:
                candidates.append((reply.version, peer, reply))
        version, donor, best = min(candidates, key=lambda c: (-c[0], c[1]))
        if best is None:
            return "kept"
        if version == hosted.version:
            mine = await self.host.in_compute(hosted.state)
            if all(torch.equal(a.detach().cpu(), b.cpu()) for a, b in zip(mine, best.tensors, strict=True)):
                return "kept"  # the donor already holds our bits (it may have copied them from us this round)
        try:
            await self.host.in_compute(hosted.load_state, best.tensors, best.version, best.applied, best.history)
        except StageMessageError as e:
            logger.warning(f"stage {stage}: could not resync from {donor[:16]}: {e}")
            return "kept"
        logger.info(f"stage {stage}: copied version {version} from {donor[:16]} after a round without a group")
        return "resynced"

    def shutdown(self) -> None:
        """Stop pending rounds (the stop event must be set) and the stages' averagers."""
        self._blocking.shutdown(wait=True, cancel_futures=True)
        for aggregator in self._aggregators.values():
            aggregator.shutdown()
        self._aggregators.clear()
