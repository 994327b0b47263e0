"""The node's life in the swarm, written once for every role (trainer, sharded trainer, stage server).

A node, whatever it does, lives in the swarm the same way:

1. ``NodeRuntime.create(config)``: load (or create) its identity from ``--identity``; no network.
2. ``runtime.start()``: start its DHT peer (``dht.start_dht``, with the run's record validator) and
   read back the multiaddrs others may dial.
3. ``runtime.announce(describe)``: publish its signed ``PeerRecord`` now and every
   ``node.heartbeat_period`` seconds (``Heartbeat``); ``describe()`` returns the role's own fields
   (capacity, sketch, roles, round, ...), read fresh at each beat. ``runtime.beat()`` publishes now.
4. ``runtime.adopt(name, stop)``: hand over a component that needs the DHT (an aggregator, a state
   sharer, an RPC loop); ``close()`` stops it before the DHT goes.
5. ``runtime.close()``: stop the heartbeat, then the adopted components (last adopted first), then
   the DHT peer and its daemon. Idempotent, safe after a partial start, leaves no child process.

What the node does now. ``runtime.phases`` is the node's :class:`PhaseClock`: a trainer enters a phase
around each part of its work (``with runtime.phases.phase("inner", ...)``), node/metrics.py reports the
seconds per phase (``zen_node_phase_seconds_total``) and node/progress.py shows the inner step, the tokens
per second and what a long wait waits for. Phases (``Phase``):

- ``inner``: inner steps (a sharded trainer's steps, remote stages included);
- ``aggregation``: one aggregation call, matchmaking then the all-reduce (in the background when rounds
  overlap); ``aggregation_wait``: the training thread waiting for an aggregation and landing it;
- ``evaluation``: the held-out loss; ``checkpoint``: writing the checkpoint after a round;
- ``download``: downloading the swarm's state (at join, a resync, a cohort move);
- ``peer_wait``: waiting for peers (``--min-peers``) or for stage servers.

A thread's phases nest: entering one pauses the phase its thread was in (landing a round between two
inner steps is not inner-step time). Phases of different threads run at once (an overlapped round's
aggregation runs beside the next inner steps), so the totals may add up to more than the wall time.

Usage::

    runtime = NodeRuntime.create(config)
    try:
        dht = runtime.start()
        runtime.adopt("aggregator", make_aggregator(dht, ...).shutdown)
        runtime.announce(lambda: {"roles": ("trainer",), "round": node.round, ...})
        ...
    finally:
        runtime.close()
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import hivemind
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from dht import Heartbeat, NodeIdentity, PeerRecord, list_peers, reap, start_dht
from dht.records import MAX_RECENT_ROUNDS
from node._version import __version__
from node.config import NodeConfig, RunConfig

logger = logging.getLogger(__name__)

MAX_MADDRS = 16  # multiaddrs a record carries at most
PEER_WAIT_POLL = 0.25  # seconds between looks at the trainer list while waiting for --min-peers

RecordFields = Callable[[], Mapping[str, Any]]  # a role's own PeerRecord fields, read at each beat


def signed_record(identity: NodeIdentity, run: RunConfig, ttl: float, **fields: Any) -> bytes:
    """A PeerRecord naming ``identity`` in ``run``, signed now; ``fields`` fill in the rest (roles, capacity, ...)."""
    return PeerRecord(
        peer_id=identity.peer_id,
        signing_key=identity.signing_public_key,
        binding=identity.binding,
        x25519_key=identity.x25519_public_key,
        version=__version__,
        run_hash=run.digest(),
        timestamp=get_dht_time(),
        run_config=run.to_bytes(),
        ttl=ttl,
        **fields,
    ).sign(identity)


class NodeRuntime:
    """One node's identity, DHT peer, signed record and heartbeat, and their orderly end.

    Args:
        config: the node's configuration (swarm, run, record ttl and heartbeat period).
        identity: the node's keys; ``NodeRuntime.create`` loads them from ``config.identity_path``.
        phases: the node's phase clock (a fresh one if None).
    """

    def __init__(self, config: NodeConfig, identity: NodeIdentity, phases: PhaseClock | None = None):
        # what the node is, and what it does now
        self.config = config
        self.run = config.run
        self.identity = identity
        self.phases = phases if phases is not None else PhaseClock()
        # its presence in the swarm, born in start() and announce()
        self._dht: hivemind.DHT | None = None
        self.maddrs: tuple[str, ...] = ()  # visible multiaddrs, published in the record
        self.heartbeat: Heartbeat | None = None
        self._describe: RecordFields | None = None
        self._last_round: dict[str, Any] = {}  # eval_loss, round_bytes and recent_rounds (note_round)
        self._recent: deque[tuple[int, float, int]] = deque(maxlen=MAX_RECENT_ROUNDS)  # (round, loss, bytes)
        self._bytes_at_last_round = 0  # the wire meter's total when the last round was noted
        self._round_beat_at = -math.inf  # when a noted round last asked for a beat (time.monotonic)
        # components that need the DHT, stopped by close() before it (last adopted first)
        self._adopted: list[tuple[str, Callable[[], None]]] = []
        self._closed = False

    @classmethod
    def create(cls, config: NodeConfig, phases: PhaseClock | None = None) -> NodeRuntime:
        """Load the identity at ``config.identity_path`` (created on first use); no network yet."""
        return cls(config, NodeIdentity.load_or_create(config.identity_path), phases)

    @property
    def dht(self) -> hivemind.DHT:
        """The running DHT peer.

        Raises:
            RuntimeError: ``start()`` was not called (or the runtime is closed).
        """
        if self._dht is None:
            raise RuntimeError("the node has not joined the swarm: call NodeRuntime.start() first")
        return self._dht

    @property
    def started(self) -> bool:
        return self._dht is not None

    def start(self) -> hivemind.DHT:
        """Start the DHT peer (raises ``dht.SwarmError`` when it cannot) and read back its multiaddrs."""
        if self._closed:
            raise RuntimeError("this NodeRuntime is closed; create another")
        if self._dht is None:
            self._dht = start_dht(self.config.swarm, self.identity, [self.run.run_id])
            self.maddrs = tuple(str(m) for m in self._dht.get_visible_maddrs())[:MAX_MADDRS]
        return self._dht

    def record(self, **fields: Any) -> bytes:
        """This node's PeerRecord, signed now, with its multiaddrs; ``fields`` are the role's own."""
        fields.setdefault("maddrs", self.maddrs)
        return signed_record(self.identity, self.run, self.config.record_ttl, **fields)

    def announce(self, describe: RecordFields) -> Heartbeat:
        """Publish ``record(**describe())`` now, then every ``heartbeat_period`` seconds until ``close()``."""
        if self.heartbeat is None:
            self._describe = describe
            self.heartbeat = Heartbeat(
                self.dht,
                self.run.run_id,
                self._current_record,
                period=self.config.heartbeat_period,
                ttl=self.config.record_ttl,
            ).start()
        return self.heartbeat

    def _current_record(self) -> bytes:
        assert self._describe is not None
        fields = {**self._describe(), **self._last_round}
        if "recent_rounds" in fields:  # a record never names a round past its own
            fields["recent_rounds"] = tuple(r for r in fields["recent_rounds"] if r[0] <= fields.get("round", 0))
        return self.record(**fields)

    def note_round(self, eval_loss: float, bytes_sent: int, round_no: int | None = None) -> None:
        """Carry a finished round's held-out loss and the bytes sent during it in the next records, published soon.

        The records also carry the last MAX_RECENT_ROUNDS rounds' (round, loss, bytes), so a reader that
        polls less often than rounds end (the bootstrap's dashboard) still sees every round's point. A round
        asks for a beat at most once a ``heartbeat_period``: the rounds between ride the next periodic beat
        (at most a period later), so short rounds (H = 5) do not publish the record (a DHT store whose
        lookups return every peer's record) once a round each.

        Args:
            eval_loss: held-out loss after the round (a non-finite one is left out).
            bytes_sent: everything sent so far (the wire meter's total); the record carries the round's share.
            round_no: the round that ended (None: only the latest figures are carried).
        """
        round_bytes = min(max(0, bytes_sent - self._bytes_at_last_round), 2**64 - 1)
        self._bytes_at_last_round = max(self._bytes_at_last_round, bytes_sent)
        loss = float(eval_loss) if math.isfinite(eval_loss) and 0 <= eval_loss <= 1e6 else -1.0
        if round_no is not None:
            while self._recent and self._recent[-1][0] >= round_no:  # a resync may go back: keep rounds increasing
                self._recent.pop()
            self._recent.append((round_no, loss, round_bytes))
        self._last_round = {"eval_loss": loss, "round_bytes": round_bytes, "recent_rounds": tuple(self._recent)}
        now = time.monotonic()
        if now - self._round_beat_at >= self.config.heartbeat_period:
            self._round_beat_at = now
            self.beat_soon()

    def beat(self) -> bool:
        """Publish the record now (after a round, a move); False when not announced or no peer stored it."""
        return self.heartbeat.beat() if self.heartbeat is not None else False

    def beat_soon(self) -> None:
        """Publish the record from the heartbeat's thread, without waiting (after each round: a DHT store
        takes tens of milliseconds, a round may take a fraction of a second)."""
        if self.heartbeat is not None:
            self.heartbeat.soon()

    def peers(self) -> list[PeerRecord]:
        """The run's live, verified peer records (this node's own included once published)."""
        return list_peers(self.dht, self.run.run_id)

    def other_trainers(self) -> list[PeerRecord]:
        """The live trainer records of the run but this node's."""
        return [p for p in self.peers() if p.peer_id != self.identity.peer_id and "trainer" in p.roles]

    def no_group_coming(self, round_no: int) -> bool:
        """Whether no group of ``round_no`` can still form with us: another peer's record shows the round (or a
        later one) finished, or no other trainer is listed at all."""
        others = self.other_trainers()
        return not others or any(p.round >= round_no for p in others)

    def others_alive(self) -> bool:
        """Whether another trainer's record is listed now."""
        return bool(self.other_trainers())

    def wait_for_trainers(self, count: int, stop_event: threading.Event, timeout: float = 300.0) -> None:
        """Wait until ``count`` trainers are listed (or ``timeout`` s pass, or ``stop_event`` is set).

        Polled every PEER_WAIT_POLL s: nodes started together then begin within about that of each other.
        """
        deadline = time.monotonic() + timeout
        with self.phases.phase("peer_wait", f"waiting for {count} trainers") as activity:
            while not stop_event.is_set():
                trainers = [p for p in self.peers() if "trainer" in p.roles]
                if len(trainers) >= count or time.monotonic() > deadline:
                    return
                detail = f"waiting for peers: {len(trainers)}/{count} trainers listed"
                if detail != activity.detail:  # logged when the count changes, not at every poll
                    logger.info(detail)
                activity.detail = detail
                stop_event.wait(PEER_WAIT_POLL)

    def adopt(self, name: str, stop: Callable[[], None]) -> None:
        """Have ``close()`` call ``stop`` after the heartbeat stops and before the DHT shuts down."""
        self._adopted.append((name, stop))

    def close(self) -> None:
        """Stop the heartbeat, the adopted components (last first), then the DHT peer. Idempotent."""
        self._closed = True
        heartbeat, self.heartbeat = self.heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()
        while self._adopted:
            name, stop = self._adopted.pop()
            try:
                stop()
            except Exception as e:  # one component failing to stop must not keep the DHT alive
                logger.debug(f"error while stopping {name}: {e}")
        dht, self._dht = self._dht, None
        if dht is not None:
            dht.shutdown()
            reap(dht, "the DHT process")


Phase = Literal["inner", "aggregation", "aggregation_wait", "evaluation", "checkpoint", "download", "peer_wait"]
PHASES: tuple[Phase, ...] = get_args(Phase)


@dataclass(eq=False)  # compared by identity: two phases alike in every field are still two
class Activity:
    """One running phase: what it is and since when."""

    phase: Phase
    detail: str  # what it does or waits for, in words, e.g. "waiting for round 3's group"
    since: float  # when it was entered (the clock's time: time.monotonic)
    thread: int  # the thread that entered it
    seconds: float = 0.0  # time spent in it before its last pause (a nested phase pauses it)
    resumed: float | None = field(default=None)  # when it last started running; None while paused

    def elapsed(self, now: float) -> float:
        """Seconds spent in this phase itself so far (nested phases excluded)."""
        return self.seconds + (now - self.resumed if self.resumed is not None else 0.0)


@dataclass(frozen=True)
class InnerProgress:
    """The current (else the last) inner phase: steps taken of how many, and its tokens per second."""

    steps: int
    total: int  # 0: not known
    tokens_per_second: float


class PhaseClock:
    """Seconds per phase and the phases running now; every method is thread-safe.

    Args:
        now: the clock it reads (``time.monotonic``; a test hands in its own).
    """

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self._lock = threading.Lock()
        self._totals: dict[Phase, float] = dict.fromkeys(PHASES, 0.0)  # finished phases' seconds
        self._stacks: dict[int, list[Activity]] = {}  # thread id -> its running phases, innermost last
        self._inner: Activity | None = None  # the current (else the last) inner phase
        self._inner_steps, self._inner_total, self._tokens_per_step = 0, 0, 0
        self._started = self._lap_at = now()  # the clock's start and the last lap (round report)
        self._lap_inner = 0.0
        self._owner, self._owner_seconds = threading.get_ident(), 0.0  # the thread that made us: time in its phases

    @contextmanager
    def phase(self, name: Phase, detail: str = "", steps: int = 0, tokens_per_step: int = 0) -> Iterator[Activity]:
        """Count the time inside the ``with`` block as ``name``; pause the thread's enclosing phase meanwhile.

        Args:
            name: the phase.
            detail: what it does or waits for, shown on the progress line.
            steps: for ``inner``: the steps the phase will take (0: not known).
            tokens_per_step: for ``inner``: tokens one step trains on (for tokens per second).

        Yields:
            The running phase (its ``detail`` may be updated as the wait goes on).
        """
        now, thread = self.now(), threading.get_ident()
        activity = Activity(name, detail, now, thread, resumed=now)
        with self._lock:
            stack = self._stacks.setdefault(thread, [])
            if stack:
                self._pause(stack[-1], now)
            stack.append(activity)
            if name == "inner":
                self._inner, self._inner_steps = activity, 0
                self._inner_total, self._tokens_per_step = steps, tokens_per_step
        try:
            yield activity
        finally:
            now = self.now()
            with self._lock:
                stack.remove(activity)
                self._totals[name] += activity.elapsed(now)
                if thread == self._owner:
                    self._owner_seconds += activity.elapsed(now)
                activity.seconds, activity.resumed = activity.elapsed(now), None
                if stack:
                    stack[-1].resumed = now
                else:
                    del self._stacks[thread]

    def stepped(self, steps: int) -> None:
        """The current inner phase has taken ``steps`` steps."""
        with self._lock:
            self._inner_steps = steps

    def totals(self) -> dict[Phase, float]:
        """Seconds spent in each phase so far, running phases included up to now (never decreasing)."""
        now = self.now()
        with self._lock:
            totals = dict(self._totals)
            for stack in self._stacks.values():
                for activity in stack:
                    totals[activity.phase] += activity.elapsed(now)
        return totals

    def running(self) -> list[Activity]:
        """The phases running now on any thread, the most recently entered last."""
        with self._lock:
            return sorted((a for stack in self._stacks.values() for a in stack), key=lambda a: a.since)

    def inner_progress(self) -> InnerProgress | None:
        """Steps and tokens per second of the current (else the last) inner phase; None before the first."""
        now = self.now()
        with self._lock:
            if self._inner is None:
                return None
            seconds = self._inner.elapsed(now)
            tokens = self._inner_steps * self._tokens_per_step
            return InnerProgress(self._inner_steps, self._inner_total, tokens / seconds if seconds > 0 else 0.0)

    def summary(self) -> str:
        """Where the time went since the clock started (the node's start, joining included), e.g. ``inner 12.1 s
        (21%), evaluation 3.0 s (5%), ...``: every finished phase that took any time, then ``other``: the time the
        clock's own thread spent in no phase (joining, reports, the DHT). A phase on another thread (the aggregation,
        beside the wait for it) counts too, so the shares may add up past 100%."""
        now = self.now()
        with self._lock:
            totals, other = dict(self._totals), now - self._started - self._owner_seconds
        wall = max(now - self._started, 1e-9)
        parts = [(name, seconds) for name, seconds in [*totals.items(), ("other", other)] if seconds >= 0.05]
        return ", ".join(f"{name} {seconds:.1f} s ({100 * seconds / wall:.0f}%)" for name, seconds in parts)

    def lap(self) -> tuple[float, float]:
        """Seconds since the previous lap and the fraction of them spent in inner steps; starts the next lap."""
        now, inner = self.now(), self.totals()["inner"]
        with self._lock:
            seconds, busy = now - self._lap_at, inner - self._lap_inner
            self._lap_at, self._lap_inner = now, inner
        return seconds, min(1.0, busy / seconds) if seconds > 0 else 0.0

    @staticmethod
    def _pause(activity: Activity, now: float) -> None:
        activity.seconds, activity.resumed = activity.elapsed(now), None


T = TypeVar("T")


class P2PLoop:
    """An asyncio loop in a daemon thread, with its own P2P replica of ``dht``'s daemon living on it.

    Its own: ``DHT.replicate_p2p()`` caches one replica per process, bound to the loop that made it, so a second
    loop in the process (a sharded trainer's stage client and its parts server) got the first loop's replica and
    hung on its first handler registration. Each loop connects its own client to the daemon instead.
    """

    def __init__(self, dht: hivemind.DHT, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        daemon = dht.run_coroutine(hivemind.DHT._get_p2p_daemon_listen_maddr)  # what replicate_p2p() reads
        self.p2p: P2P = self.run(P2P.replicate(daemon), timeout=30)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def shutdown(self) -> None:
        if not self.loop.is_running():
            return
        try:
            self.run(self._close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()

    async def _close(self) -> None:
        await self.p2p.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
