"""The bootstrap peer: a long-running DHT peer with a stable PeerID that nodes join through.

What makes a hivemind DHT peer a good bootstrap peer, and how this module gets each part:

- A stable address. The PeerID comes from the libp2p key in the identity folder
  (:meth:`dht.NodeIdentity.load_or_create`), so a restart keeps the multiaddrs that nodes were
  given. The listen port is exclusive: go-libp2p binds with SO_REUSEPORT by default, which lets a
  second daemon bind the same port and silently share its connections with the first, so we set
  ``LIBP2P_TCP_REUSEPORT=false`` (unless the environment already sets it) and a taken port fails.
- A relay. With ``use_relay=True`` p2pd enables circuit relay v2 and, by default, its relay
  *service* (``-relayService``), so nodes behind NAT that run with ``use_auto_relay`` can reserve
  a slot here and be reached through us. hivemind's ``relay_hop_limit`` is deprecated in p2pd
  and does nothing, so it is not passed. go-libp2p starts the relay service only once the peer
  believes it is publicly reachable (AutoNAT, which needs a few peers to dial back); a host known
  to be public can say so at once with ``force_reachability="public"``.
- A view of the swarm. A poller thread asks p2pd for its open connections, the DHT process for the
  requests it served (bootstrap/dht_requests.py), and, for each run id
  (``--run-id``, else the runs found in its own DHT storage: bootstrap/discovery.py), reads the run's
  signed peer records; :class:`~bootstrap.monitor.SwarmMonitor` logs the changes,
  :meth:`BootstrapPeer.health` reports them at ``/healthz``, and :class:`~bootstrap.swarm_api.SwarmBoard`
  keeps them for the dashboard (``/``, ``/api/swarm``) and ``/metrics`` (bootstrap/dashboard.py).

A bootstrap peer publishes no record of its own and trains nothing; it imports ``dht`` only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from bootstrap.dashboard import dashboard_routes
from bootstrap.dht_requests import DHTRequestCounter, request_counts
from bootstrap.discovery import rejections, stored_runs
from bootstrap.health import HealthServer
from bootstrap.metrics import BootstrapMetrics, MetricsSnapshot
from bootstrap.monitor import SwarmMonitor
from bootstrap.swarm_api import MAX_RUNS, SwarmBoard
from dht import (
    IdentityError,
    NodeIdentity,
    SwarmConfig,
    SwarmError,
    check_multiaddr,
    list_peers,
    list_summaries,
    reap,
    start_dht,
)

logger = logging.getLogger(__name__)

REACHABILITY_CHOICES = ("public", "private")
_RPC_TIMEOUT = 30.0  # seconds one call may wait on the DHT process before it counts as stuck
_WAIT_SLICE = 0.5  # seconds between two checks that the DHT process is alive, during a call
_STOP_GRACE = 5.0  # seconds stop() waits for the poller
_T = TypeVar("_T")


class BootstrapError(Exception):
    """The bootstrap peer could not start; the message names the problem and the fix."""


@dataclass
class BootstrapConfig:
    """Everything a bootstrap peer needs; each field maps onto one ``zen-bootstrap`` flag."""

    identity_dir: Path = Path("bootstrap.id")  # folder holding the keys; the same folder keeps the PeerID
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/31337"])  # where to listen
    announce_maddrs: list[str] = field(default_factory=list)  # public addresses to advertise instead
    initial_peers: list[str] = field(default_factory=list)  # other bootstrap peers to join, with /p2p/
    http_host: str = "127.0.0.1"  # address of the health endpoint; 0.0.0.0 exposes it
    http_port: int = 8080  # port of the health endpoint; 0 picks a free one
    run_ids: list[str] = field(default_factory=list)  # runs whose peer records are tracked and logged
    poll_period: float = 2.0  # seconds between two looks at the swarm
    force_reachability: str | None = None  # "public" or "private"; None lets AutoNAT decide
    exclusive_port: bool = True  # fail when the listen port is taken instead of sharing it (SO_REUSEPORT)
    startup_timeout: float = 30.0  # seconds p2pd may take to start (and reach initial peers)

    def __post_init__(self) -> None:
        self.identity_dir = Path(self.identity_dir)
        if not self.host_maddrs:
            raise ValueError("host_maddrs: need at least one listen multiaddr, e.g. /ip4/0.0.0.0/tcp/31337")
        for name in ("host_maddrs", "announce_maddrs", "initial_peers"):
            for maddr in getattr(self, name):
                check_multiaddr(maddr, name, need_peer_id=name == "initial_peers")
        for maddr in self.announce_maddrs:
            if "/tcp/0/" in maddr + "/" or "/udp/0/" in maddr + "/":
                raise ValueError(f"announce_maddrs: {maddr!r} has port 0; announce the real public port")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in 0..65535 (0 = any free port), got {self.http_port}")
        if not self.http_host:
            raise ValueError("http_host must be an address, e.g. 127.0.0.1 or 0.0.0.0")
        for run_id in self.run_ids:
            if not run_id or run_id != run_id.strip() or len(run_id) > 128:
                raise ValueError(f"run_ids: {run_id!r} must be 1-128 characters without surrounding spaces")
        if self.poll_period <= 0:
            raise ValueError(f"poll_period must be > 0 seconds, got {self.poll_period}")
        if self.force_reachability not in (None, *REACHABILITY_CHOICES):
            raise ValueError(f"force_reachability must be one of {REACHABILITY_CHOICES} or None")
        if self.startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {self.startup_timeout}")


class BootstrapPeer:
    """A running bootstrap peer: DHT process, swarm poller and health endpoint.

    Build it with :meth:`create`, wait with :meth:`wait`, end it with :meth:`stop` (or use it as
    a context manager). :meth:`stop`, :meth:`wait` and :meth:`health` may be called from any thread.

    Args:
        config: what to run.
        stop_event: setting it ends the poller, so :meth:`wait` returns; a fresh one if None.
    """

    def __init__(self, config: BootstrapConfig, stop_event: threading.Event | None = None):
        self.config = config
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.monitor = SwarmMonitor(config.run_ids)
        self.board = SwarmBoard()  # verified records and round histories, for the dashboard
        self.metrics = BootstrapMetrics(self.metrics_snapshot)
        self._rejected: dict[str, int] = {}  # the DHT process's validator refusals, as of the last poll
        self._polls = 0  # looks at the swarm so far
        self._dht_requests = 0  # DHT calls the poller made so far
        self._dht_traffic: dict[str, dict[str, int]] = {}  # DHT requests served and sent, by kind, as of the last poll
        self.identity: NodeIdentity | None = None
        self.dht: hivemind.DHT | None = None
        self.maddrs: list[str] = []  # our full multiaddrs, each ending in /p2p/<PeerID>
        self.failed = False  # True once the DHT process died under us
        self._health: HealthServer | None = None
        self._started_at: float | None = None
        self._p2pd_pid: int | None = None
        self._poller = threading.Thread(target=self._poll_forever, name="zen-bootstrap-poller", daemon=True)
        self._stopped = False
        self._stop_lock = threading.Lock()

    @classmethod
    def create(cls, config: BootstrapConfig, stop_event: threading.Event | None = None) -> BootstrapPeer:
        """Start a bootstrap peer and return it once it serves the DHT and the health endpoint.

        Raises:
            BootstrapError: the identity is corrupt, a port is taken, an address is unusable.
        """
        peer = cls(config, stop_event)
        try:
            peer.start()
        except BaseException:
            peer.stop()
            raise
        return peer

    @property
    def peer_id(self) -> str:
        if self.identity is None:
            raise RuntimeError("the bootstrap peer is not started")
        return self.identity.peer_id

    @property
    def health_url(self) -> str:
        if self._health is None:
            raise RuntimeError("the bootstrap peer is not started")
        return self._health.url

    @property
    def dashboard_url(self) -> str:
        """The dashboard page, e.g. ``http://127.0.0.1:8080/`` (``/api/swarm`` and ``/metrics`` beside it)."""
        return self.health_url.removesuffix("healthz")

    @property
    def join_maddr(self) -> str:
        """The address to hand to nodes: announced first, else a non-loopback TCP one, else any."""
        if self.config.announce_maddrs or not self.maddrs:
            return self.maddrs[0] if self.maddrs else ""
        for maddr in self.maddrs:
            if "/tcp/" in maddr and not maddr.startswith(("/ip4/127.", "/ip6/::1/")):
                return maddr
        return self.maddrs[0]

    def start(self) -> None:
        """Load the identity, start the DHT, bind the HTTP port, then serve and poll."""
        config = self.config
        try:
            self.identity = NodeIdentity.load_or_create(config.identity_dir)
        except IdentityError as e:
            raise BootstrapError(str(e)) from None
        except OSError as e:
            raise BootstrapError(
                f"cannot write the identity in {config.identity_dir}: {e.strerror or e}; choose a writable folder"
            ) from None
        if config.exclusive_port:
            os.environ.setdefault("LIBP2P_TCP_REUSEPORT", "false")  # inherited by p2pd; see the module doc
        swarm = SwarmConfig(
            initial_peers=list(config.initial_peers),
            host_maddrs=list(config.host_maddrs),
            announce_maddrs=list(config.announce_maddrs),
            client_mode=False,
            use_relay=True,
            use_auto_relay=False,
            startup_timeout=config.startup_timeout,
        )
        extra: dict[str, Any] = {"authorizer": DHTRequestCounter()}  # counts the DHT requests we serve
        if config.force_reachability is not None:
            extra["force_reachability"] = config.force_reachability
        try:
            self.dht = start_dht(swarm, self.identity, run_ids=config.run_ids, **extra)
        except SwarmError as e:
            raise BootstrapError(str(e)) from None
        self.maddrs = [str(maddr) for maddr in self.dht.get_visible_maddrs()]
        self._p2pd_pid = self.dht.run_coroutine(_p2pd_pid)
        try:
            # Bound after the DHT process is forked, so that process never holds a copy of the socket
            # (a copy would keep the port taken for as long as that process lives).
            routes = dashboard_routes(self.board, self.metrics, config.run_ids, get_dht_time)
            self._health = HealthServer(config.http_host, config.http_port, self.health, routes)
        except OSError as e:
            where = f"{config.http_host}:{config.http_port}"
            if e.errno == errno.EADDRINUSE:
                raise BootstrapError(f"HTTP port {where} is in use; pick a free port, or 0 for any free port") from None
            raise BootstrapError(
                f"cannot serve HTTP on {where}: {e.strerror or e}; use an address of this machine, "
                f"e.g. 127.0.0.1 or 0.0.0.0"
            ) from None
        self._started_at = time.monotonic()
        self._health.start()
        self._poller.start()
        logger.info(f"bootstrap peer {self.peer_id} is up on {', '.join(self.maddrs)}")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the peer stops polling (stop event set, or the DHT died); return whether it did."""
        if self._poller.is_alive():
            self._poller.join(timeout)
        return not self._poller.is_alive()

    def health(self) -> dict[str, Any] | None:
        """The health report served at ``/healthz``, or None while starting or after the DHT died."""
        if self._started_at is None or self.failed or self.identity is None:
            return None
        view = self.monitor.view()
        return {
            "peer_id": self.identity.peer_id,
            "uptime_seconds": round(time.monotonic() - self._started_at, 3),
            "peers_seen": view.seen,
            "peers_connected": len(view.connected),
            "maddrs": list(self.maddrs),
            "run_records": {run_id: len(peer_ids) for run_id, peer_ids in view.records.items()},
        }

    def metrics_snapshot(self) -> MetricsSnapshot:
        """The figures ``/metrics`` reports (see bootstrap/metrics.py)."""
        view = self.monitor.view()
        return MetricsSnapshot(
            peers_connected=len(view.connected),
            peers_seen=view.seen,
            run_peers=self.board.peer_counts(),
            rejected=dict(self._rejected),
            polls=self._polls,
            dht_requests=self._dht_requests,
            dht_served=dict(self._dht_traffic.get("served", {})),
            dht_sent=dict(self._dht_traffic.get("sent", {})),
        )

    def poll(self) -> None:
        """Take one look at the swarm: connected peers, the validator's refusals, then each run's records.

        Raises:
            BootstrapError: the DHT process died, or a call to it took over ``_RPC_TIMEOUT`` seconds.
        """
        if self.dht is None:
            raise RuntimeError("the bootstrap peer is not started")
        connected = self._result(self.dht.run_coroutine(_connected_peers, return_future=True))
        if isinstance(connected, str):
            raise BootstrapError(f"p2pd did not list its connections: {connected}")
        self.monitor.update_connected(connected)
        self._rejected = self._result(self.dht.run_coroutine(rejections, return_future=True))
        self._dht_traffic = self._result(self.dht.run_coroutine(request_counts, return_future=True))
        run_ids = list(self.config.run_ids)
        if not run_ids:  # no --run-id: every run this peer stores a verified record of
            found = self._result(self.dht.run_coroutine(partial(stored_runs, limit=MAX_RUNS), return_future=True))
            run_ids = sorted(set(found) | set(self.board.runs()))  # known runs are read until they empty
        for run_id in run_ids:
            records = list_peers(cast(hivemind.DHT, _BoundedDHT(self)), run_id)
            self.monitor.update_records(run_id, [record.peer_id for record in records])
            self.board.update(run_id, records)
            entries = list_summaries(cast(hivemind.DHT, _BoundedDHT(self)), run_id)
            self.board.update_ledger(run_id, [e.summary for e in entries if e.summary is not None])
        self._polls += 1

    def _result(self, future: Future[_T]) -> _T:
        # hivemind's futures never resolve if the DHT process dies mid-call: wait in short slices,
        # giving up when that process is gone, when we are asked to stop, or after _RPC_TIMEOUT.
        assert self.dht is not None
        self._dht_requests += 1
        deadline = time.monotonic() + _RPC_TIMEOUT
        while True:
            try:
                return future.result(timeout=_WAIT_SLICE)
            except TimeoutError:
                pass
            if not self.dht.is_alive() or self.stop_event.is_set() or time.monotonic() > deadline:
                future.cancel()
                reason = "stopping" if self.stop_event.is_set() else "no answer from the DHT process"
                raise BootstrapError(f"gave up a DHT call: {reason}")

    def stop(self) -> None:
        """Stop polling, close the health endpoint, shut the DHT and its p2pd down. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.stop_event.set()
        if self._poller.is_alive():
            self._poller.join(timeout=_STOP_GRACE)  # its calls wait in slices that look at stop_event
        if self._health is not None:
            self._health.stop()
        if self.dht is not None:
            if self._p2pd_running() is not False:
                self.dht.shutdown()  # graceful: the DHT process stops p2pd and waits for it
            elif self.dht.is_alive():
                # p2pd is gone already (Ctrl-C reaches the whole process group): without it the DHT
                # process cannot shut down gracefully and would only time out, so end it now.
                self.dht.terminate()
            reap(self.dht, "the DHT process")
            if self._p2pd_running():
                # The DHT process had to be killed before it stopped p2pd, which now outlives it.
                logger.warning(f"p2pd (pid {self._p2pd_pid}) outlived the DHT process; terminating it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(cast(int, self._p2pd_pid), signal.SIGTERM)
        if self._started_at is not None:
            logger.info("bootstrap peer stopped")

    def _poll_forever(self) -> None:
        assert self.dht is not None
        while not self.stop_event.is_set():
            if not self.dht.is_alive():
                # A signal sent to the whole process group (Ctrl-C, systemd) ends the DHT process too;
                # give our own handler a moment to land so that such a stop is not reported as a failure.
                if self.stop_event.wait(1.0):
                    return
                logger.error(f"the DHT process exited (code {self.dht.exitcode}); stopping")
                self.failed = True
                return
            try:
                self.poll()
            except Exception as e:  # one failed look must not end the monitor; the next one retries
                if not self.stop_event.is_set() and self.dht.is_alive():
                    logger.warning(f"could not poll the swarm: {type(e).__name__}: {e}")
            self.stop_event.wait(self.config.poll_period)

    def _p2pd_running(self) -> bool | None:
        """Whether our p2pd still runs (a zombie counts as gone); None where we cannot tell (no /proc)."""
        if self._p2pd_pid is None or not os.path.isdir("/proc/self"):
            return None
        try:
            with open(f"/proc/{self._p2pd_pid}/cmdline", "rb") as f:
                return b"p2pd" in f.read().split(b"\0", 1)[0]  # empty for a zombie; checks pid reuse
        except OSError:
            return False

    def __enter__(self) -> BootstrapPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _BoundedDHT:
    """What ``dht.list_peers`` calls on a DHT (``get``), waiting the bounded way (see ``_result``)."""

    def __init__(self, peer: BootstrapPeer):
        self._peer = peer

    def get(self, key: str, latest: bool = False, **kwargs: Any) -> Any:
        assert self._peer.dht is not None
        return self._peer._result(self._peer.dht.get(key, latest=latest, return_future=True, **kwargs))


async def _connected_peers(_dht: hivemind.DHT, node: DHTNode) -> dict[str, list[str]] | str:
    """Runs inside the DHT process: PeerID -> addresses of every open libp2p connection.

    A failure comes back as its message rather than raised: hivemind would log a raised one with a
    traceback, and p2pd vanishing under a Ctrl-C is no reason for one.
    """
    try:
        infos = await node.p2p.list_peers()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    peers: dict[str, list[str]] = {}
    for info in infos:
        addrs = peers.setdefault(info.peer_id.to_base58(), [])
        addrs.extend(str(addr) for addr in info.addrs if str(addr) not in addrs)
    return peers


async def _p2pd_pid(_dht: hivemind.DHT, node: DHTNode) -> int | None:
    """Runs inside the DHT process: the pid of its p2pd child (hivemind keeps it private)."""
    child = getattr(node.p2p, "_child", None)
    return getattr(child, "pid", None)
