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

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

from dht import Heartbeat, NodeIdentity, PeerRecord, list_peers, start_dht
from node._version import __version__
from node.config import NodeConfig, RunConfig

logger = logging.getLogger(__name__)

MAX_MADDRS = 16  # multiaddrs a record carries at most

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
    """

    def __init__(self, config: NodeConfig, identity: NodeIdentity):
        # what the node is
        self.config = config
        self.run = config.run
        self.identity = identity
        # its presence in the swarm, born in start() and announce()
        self._dht: hivemind.DHT | None = None
        self.maddrs: tuple[str, ...] = ()  # visible multiaddrs, published in the record
        self.heartbeat: Heartbeat | None = None
        self._describe: RecordFields | None = None
        self._last_round: dict[str, Any] = {}  # eval_loss and round_bytes of the last round (note_round)
        self._bytes_at_last_round = 0  # the wire meter's total when the last round was noted
        # components that need the DHT, stopped by close() before it (last adopted first)
        self._adopted: list[tuple[str, Callable[[], None]]] = []
        self._closed = False

    @classmethod
    def create(cls, config: NodeConfig) -> NodeRuntime:
        """Load the identity at ``config.identity_path`` (created on first use); no network yet."""
        return cls(config, NodeIdentity.load_or_create(config.identity_path))

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
        return self.record(**{**self._describe(), **self._last_round})

    def note_round(self, eval_loss: float, bytes_sent: int) -> None:
        """Carry a finished round's held-out loss and the bytes sent during it in the next records.

        Args:
            eval_loss: held-out loss after the round (a non-finite one is left out).
            bytes_sent: everything sent so far (the wire meter's total); the record carries the round's share.
        """
        round_bytes = max(0, bytes_sent - self._bytes_at_last_round)
        self._bytes_at_last_round = max(self._bytes_at_last_round, bytes_sent)
        loss = eval_loss if math.isfinite(eval_loss) and 0 <= eval_loss <= 1e6 else -1.0
        self._last_round = {"eval_loss": float(loss), "round_bytes": min(round_bytes, 2**64 - 1)}

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

    def wait_for_trainers(self, count: int, stop_event: threading.Event, timeout: float = 300.0) -> None:
        """Wait until ``count`` trainers are listed (or ``timeout`` s pass, or ``stop_event`` is set)."""
        deadline = time.monotonic() + timeout
        while not stop_event.is_set():
            trainers = [p for p in self.peers() if "trainer" in p.roles]
            if len(trainers) >= count or time.monotonic() > deadline:
                return
            logger.info(f"waiting for peers: {len(trainers)}/{count} trainers listed")
            stop_event.wait(1.0)

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
