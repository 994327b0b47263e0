"""Joining the swarm: start a hivemind DHT peer, publish a signed record, keep it fresh, list peers.

A node's liveness is its record: it is republished every ``heartbeat_period`` seconds with an
expiry of ``record_ttl`` seconds, so a node that dies leaves ``list_peers`` within one TTL of
its last heartbeat. Readers re-verify every record they get (the validator already ran on the
way in; checking again costs microseconds and keeps this function safe on any DHT).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import hivemind
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from dht.config import SwarmConfig, SwarmError
from dht.identity import NodeIdentity
from dht.records import PeerRecord, RecordError
from dht.validator import MAX_TTL, PeerRecordValidator, peers_key

logger = logging.getLogger(__name__)

MIN_BEAT_GAP = 0.5  # seconds a nudged heartbeat waits, so that nudges close together make one beat
REAP_GRACE = 5.0  # seconds reap() waits for a stopped hivemind process, before and after SIGKILL


def reap(process: multiprocessing.Process, what: str) -> None:
    """Wait for a hivemind process that was asked to stop (``shutdown()`` or ``terminate()``); kill it if it hangs.

    hivemind's ``shutdown()`` waits a few seconds, sends SIGTERM and returns without waiting; at exit,
    multiprocessing then joins the process with no timeout, so a child stuck outside Python code (where
    no signal handler runs) would keep its parent from ever exiting. Logs a warning when it kills.
    """
    process.join(timeout=REAP_GRACE)
    if process.is_alive():
        logger.warning(f"{what} (pid {process.pid}) did not stop after SIGTERM; killing it")
        process.kill()
        process.join(timeout=REAP_GRACE)


def start_dht(
    config: SwarmConfig, identity: NodeIdentity | None, run_ids: Sequence[str] = (), **kwargs
) -> hivemind.DHT:
    """Start a DHT peer with our record validator; translate failures into :class:`SwarmError`."""
    validator = PeerRecordValidator(run_ids)
    options: dict[str, object] = dict(
        initial_peers=config.initial_peers or None,
        host_maddrs=config.host_maddrs,
        announce_maddrs=config.announce_maddrs or None,
        client_mode=config.client_mode,
        use_relay=config.use_relay,
        use_auto_relay=config.use_auto_relay,
        startup_timeout=config.startup_timeout,
        record_validators=[validator],
        # hivemind's identity check assumes RSA keys; ours are Ed25519 (see identity.py).
        check_if_identity_free=False,
    )
    if identity is not None:
        options["identity_path"] = str(identity.p2p_key_path)
    options.update(kwargs)
    try:
        return hivemind.DHT(start=True, **options)
    except Exception as e:
        raise SwarmError(_explain_start_failure(str(e), config)) from None


def _explain_start_failure(message: str, config: SwarmConfig) -> str:
    text = " ".join(message.split())
    if "failed to connect to bootstrap peers" in text:
        return (
            f"cannot reach any initial peer ({', '.join(config.initial_peers)}); check that the bootstrap "
            f"peer is running and the address (including /p2p/<PeerID>) is the one it printed"
        )
    if "address already in use" in text:
        return f"a listen address is in use ({', '.join(config.host_maddrs)}); pick a free port or use port 0"
    if "cannot assign requested address" in text:
        return f"cannot listen on {', '.join(config.host_maddrs)}: not an address of this machine"
    return f"could not start the DHT peer: {text[:300]}"


def publish_record(dht: hivemind.DHT, run_id: str, envelope: bytes, ttl: float = MAX_TTL / 2) -> bool:
    """Store a signed record under the run's peers key; return whether any replica accepted it."""
    peer_record = PeerRecord.verify(envelope)
    # The record's own signed ttl caps its life; validators refuse anything longer.
    expiration = min(get_dht_time() + ttl, peer_record.timestamp + peer_record.ttl)
    ok = dht.store(peers_key(run_id), envelope, expiration_time=expiration, subkey=peer_record.peer_id)
    return bool(ok)


def list_peers(dht: hivemind.DHT, run_id: str) -> list[PeerRecord]:
    """Return the live, valid peer records of ``run_id``, sorted by PeerID."""
    found = dht.get(peers_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    validator = PeerRecordValidator([run_id])
    records = []
    now = get_dht_time()
    for subkey, item in found.value.items():
        try:
            record = DHTRecord(
                key=b"", subkey=_dumps(subkey), value=_dumps(item.value), expiration_time=item.expiration_time
            )
            records.append(validator.check(record, now=now))
        except (RecordError, AttributeError, TypeError) as e:
            logger.warning(f"ignoring a peer record from the DHT: {e}")
    return sorted(records, key=lambda r: r.peer_id)


def _dumps(obj: object) -> bytes:
    return MSGPackSerializer.dumps(obj)


async def _connect(_dht: hivemind.DHT, node: Any, targets: list[tuple[str, list[str]]]) -> int:
    connected = 0
    for peer_id, maddrs in targets:
        try:
            await node.p2p._client.connect(PeerID.from_base58(peer_id), [Multiaddr(m) for m in maddrs])
            connected += 1
        except Exception as e:
            logger.debug(f"could not connect to {peer_id[:16]}: {e}")
    return connected


def connect_to_peers(dht: hivemind.DHT, records: Sequence[PeerRecord]) -> int:
    """Dial peers at the multiaddrs their signed records announce; return how many answered.

    hivemind's DHT carries PeerIDs, not addresses, and libp2p finds a peer's address through
    peers that are connected to it. Once idle connections to the bootstrap peer are pruned, a
    newcomer would have no route to older peers; the addresses in their records give it one.
    """
    own = dht.peer_id.to_base58()
    targets = [(r.peer_id, list(r.maddrs)) for r in records if r.maddrs and r.peer_id != own]
    if not targets:
        return 0
    return int(dht.run_coroutine(partial(_connect, targets=targets)))


class Heartbeat:
    """Republish a node's record every ``period`` seconds from a background thread.

    Args:
        dht: a started DHT.
        run_id: the run whose peers key holds the record.
        make_record: builds a fresh signed envelope each beat (so round and state digest stay current).
        period: seconds between beats.
        ttl: record lifetime in seconds; a dead node leaves the listing within ``ttl``.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        make_record: Callable[[], bytes],
        period: float = 5.0,
        ttl: float = 15.0,
    ):
        if not 0 < period < ttl <= MAX_TTL:
            raise ValueError(f"need 0 < period < ttl <= {MAX_TTL}, got period={period}, ttl={ttl}")
        self.dht, self.run_id, self.make_record = dht, run_id, make_record
        self.period, self.ttl = period, ttl
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by ``soon``: beat now rather than at the next period
        self._thread = threading.Thread(target=self._run, name="zen-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> bool:
        """Publish the current record now; return whether the DHT accepted it."""
        try:
            ok = publish_record(self.dht, self.run_id, self.make_record(), ttl=self.ttl)
        except Exception as e:  # a failed beat must not kill the node; the next one retries
            logger.warning(f"heartbeat failed: {e}")
            return False
        if not ok:
            logger.warning("heartbeat: no DHT peer stored our record (will retry)")
        return ok

    def soon(self) -> None:
        """Have the background thread publish the record now, without waiting for it (requests that
        arrive while it publishes, or within ``MIN_BEAT_GAP`` seconds of a beat, make one beat)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self.period)
            if (woken and self._stop.wait(MIN_BEAT_GAP)) or self._stop.is_set():
                break  # (after a nudge, a short wait lets nudges close together make one beat)
            self._wake.clear()
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.period + 5)
