"""Swarm behaviour with real hivemind DHT peers on 127.0.0.1: publish, list, refuse forgeries, expire.

A malicious peer here is a plain ``hivemind.DHT`` with no validator: it stores whatever it likes
locally and offers it to everyone, so only the honest peers' validators stand between a forgery
and ``list_peers``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import hivemind
import msgpack
import pytest
from helpers import LOCALHOST_MADDR, wait_until
from hivemind.utils import get_dht_time

from dht import (
    MAX_TTL,
    Heartbeat,
    NodeIdentity,
    PeerRecord,
    RecordError,
    SwarmConfig,
    SwarmError,
    list_peers,
    peers_key,
    publish_record,
    start_dht,
)
from dht.records import RECORD_TAG

if TYPE_CHECKING:
    from conftest import SwarmPeer

IdentityFactory = Callable[[str | None], NodeIdentity]
RecordFactory = Callable[..., PeerRecord]
SwarmFactory = Callable[..., "list[SwarmPeer]"]

WAIT_SECONDS = 30.0  # upper bound for the swarm to converge; a healthy run takes well under a second


def listed_ids(peer: SwarmPeer, run_id: str) -> set[str]:
    return {record.peer_id for record in list_peers(peer.dht, run_id)}


# --- publish and list ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_peers", [1, 3])
def test_published_records_are_listed_by_every_peer(
    swarm_factory: SwarmFactory, record_factory: RecordFactory, run_id: str, num_peers: int
) -> None:
    """Every peer's signed record, once published, shows up in every peer's list_peers."""
    # Prepare
    peers = swarm_factory(num_peers, run_ids=[run_id])
    records = {p.identity.peer_id: record_factory(p.identity) for p in peers}

    # Execute
    stored = [publish_record(p.dht, run_id, records[p.identity.peer_id].sign(p.identity)) for p in peers]

    # Assert
    assert all(stored)
    for peer in peers:
        wait_until(
            lambda peer=peer: listed_ids(peer, run_id) == set(records),
            WAIT_SECONDS,
            f"{peer.identity.peer_id} to list all",
        )
        assert list_peers(peer.dht, run_id) == sorted(records.values(), key=lambda r: r.peer_id)


def test_unknown_run_lists_no_peers(dht_swarm: list[SwarmPeer]) -> None:
    """A run nobody published under lists no peers."""
    # Execute
    listed = list_peers(dht_swarm[1].dht, "no-such-run")

    # Assert
    assert listed == []


def test_publish_refuses_an_invalid_envelope(
    dht_swarm: list[SwarmPeer], identity_factory: IdentityFactory, record_factory: RecordFactory, run_id: str
) -> None:
    """publish_record verifies the envelope first, so a node cannot publish what peers would refuse."""
    # Prepare
    peer, other = dht_swarm[0], identity_factory(None)
    envelope = record_factory(other).sign(other)
    tag, body, _ = msgpack.unpackb(envelope)
    forged = msgpack.packb([tag, body, peer.identity.sign(tag.encode() + body)])

    # Execute / Assert
    with pytest.raises(RecordError, match="signature"):
        publish_record(peer.dht, run_id, forged)


# --- a malicious peer -----------------------------------------------------------------------------------


@pytest.fixture
def malicious_dht(dht_swarm: list[SwarmPeer]) -> Iterator[hivemind.DHT]:
    """A plain hivemind peer with no record validator, joined to ``dht_swarm``."""
    dht = hivemind.DHT(initial_peers=dht_swarm[0].maddrs, host_maddrs=[LOCALHOST_MADDR], start=True)
    try:
        yield dht
    finally:
        dht.shutdown()


def _forged_signature(victim: NodeIdentity, attacker: NodeIdentity, record: PeerRecord) -> tuple[bytes, float]:
    tag, body, _ = msgpack.unpackb(record.sign(victim))
    return msgpack.packb([tag, body, attacker.sign(tag.encode() + body)]), 10.0


def _tampered_body(victim: NodeIdentity, attacker: NodeIdentity, record: PeerRecord) -> tuple[bytes, float]:
    tag, body, signature = msgpack.unpackb(record.sign(victim))
    at = body.index(record.sketch)
    return msgpack.packb([tag, body[:at] + bytes([body[at] ^ 1]) + body[at + 1 :], signature]), 10.0


def _unbound_signing_key(victim: NodeIdentity, attacker: NodeIdentity, record: PeerRecord) -> tuple[bytes, float]:
    # The attacker names the victim but signs with, and carries the binding of, its own keys.
    wire = msgpack.packb(
        {
            **msgpack.unpackb(msgpack.unpackb(record.sign(victim))[1]),
            "signing_key": attacker.signing_public_key,
            "binding": attacker.binding,
        }
    )
    return msgpack.packb([RECORD_TAG, wire, attacker.sign(RECORD_TAG.encode() + wire)]), 10.0


def _far_future_expiry(victim: NodeIdentity, attacker: NodeIdentity, record: PeerRecord) -> tuple[bytes, float]:
    # A genuine record replayed with an expiry far past the cap, to pin it in TimedStorage.
    return record.sign(victim), 3600.0


def _not_a_record(victim: NodeIdentity, attacker: NodeIdentity, record: PeerRecord) -> tuple[bytes, float]:
    return b"hello, world", 10.0


@pytest.mark.parametrize(
    "attack", [_forged_signature, _tampered_body, _unbound_signing_key, _far_future_expiry, _not_a_record]
)
def test_malicious_records_never_reach_honest_listings(
    dht_swarm: list[SwarmPeer],
    malicious_dht: hivemind.DHT,
    identity_factory: IdentityFactory,
    record_factory: RecordFactory,
    run_id: str,
    attack: Callable[[NodeIdentity, NodeIdentity, PeerRecord], tuple[bytes, float]],
) -> None:
    """A bad record stored by a malicious peer is refused by honest peers; a good one on the same path arrives."""
    # Prepare
    victim, attacker, control = identity_factory(None), identity_factory(None), identity_factory(None)
    value, lifetime = attack(victim, attacker, record_factory(victim))
    key = peers_key(run_id)

    # Execute: the bad record first, then (once its store has finished) a valid control record.
    malicious_dht.store(key, value, expiration_time=get_dht_time() + lifetime, subkey=victim.peer_id)
    malicious_dht.store(
        key, record_factory(control).sign(control), expiration_time=get_dht_time() + 10, subkey=control.peer_id
    )

    # Assert
    for peer in dht_swarm:
        wait_until(
            lambda peer=peer: control.peer_id in listed_ids(peer, run_id), WAIT_SECONDS, "the control record to arrive"
        )
        raw = peer.dht.get(key, latest=True)
        assert victim.peer_id not in raw.value, "an honest peer passed on a record its validator should refuse"
        assert victim.peer_id not in listed_ids(peer, run_id)


# --- liveness ------------------------------------------------------------------------------------------


def test_stopped_heartbeat_leaves_listing_within_ttl(
    dht_swarm: list[SwarmPeer], record_factory: RecordFactory, run_id: str
) -> None:
    """A live node's record is refreshed each beat; once its heartbeat stops it leaves list_peers within one ttl."""
    # Prepare
    node, observer = dht_swarm[0], dht_swarm[-1]
    period, ttl, slack = 0.5, 2.0, 3.0  # slack: one list_peers round trip on a loaded 2-core machine
    heartbeat = Heartbeat(
        node.dht, run_id, lambda: record_factory(node.identity).sign(node.identity), period=period, ttl=ttl
    )

    def observed_timestamp() -> float | None:
        return next((r.timestamp for r in list_peers(observer.dht, run_id) if r.peer_id == node.identity.peer_id), None)

    # Execute
    heartbeat.start()
    try:
        first = wait_until(observed_timestamp, WAIT_SECONDS, "the first beat to be listed")
        wait_until(lambda: (observed_timestamp() or 0.0) > first, WAIT_SECONDS, "a later beat to replace the first")
    finally:
        heartbeat.stop()
    stopped_at = time.monotonic()
    wait_until(lambda: observed_timestamp() is None, ttl + slack, "the record to expire")

    # Assert
    assert time.monotonic() - stopped_at <= ttl + slack


@pytest.mark.parametrize(
    ("period", "ttl"), [(2.0, 2.0), (3.0, 2.0), (0.0, 2.0), (-1.0, 2.0), (1.0, MAX_TTL + 1)], ids=str
)
def test_heartbeat_rejects_bad_period_or_ttl(period: float, ttl: float) -> None:
    """A heartbeat needs 0 < period < ttl <= MAX_TTL, or a record could lapse between beats."""
    # Execute / Assert
    with pytest.raises(ValueError, match="period < ttl"):
        Heartbeat(None, "run", lambda: b"", period=period, ttl=ttl)


# --- joining -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "maddr"),
    [
        ("host_maddrs", "not-a-multiaddr"),
        ("host_maddrs", ""),
        ("host_maddrs", "/ip4/999.0.0.1/tcp/0"),
        ("host_maddrs", "/ip4/127.0.0.1/tcp/70000"),
        ("announce_maddrs", "203.0.113.5:31337"),
        ("initial_peers", "/ip4/127.0.0.1/tcp/31337/p2p/not-a-peer-id"),
        ("initial_peers", "127.0.0.1:31337"),
    ],
)
def test_swarm_config_rejects_malformed_multiaddrs(field: str, maddr: str) -> None:
    """A malformed multiaddr is refused with a ValueError that names the field and shows a correct example."""
    # Execute / Assert
    with pytest.raises(ValueError, match=rf"^{field}: .* is not a valid multiaddr .*expected e\.g\. /ip4/"):
        SwarmConfig(**{field: [maddr]})


def test_swarm_config_rejects_initial_peer_without_peer_id() -> None:
    """An initial peer lacking /p2p/<PeerID> is refused with a message saying to copy the full address."""
    # Execute / Assert
    with pytest.raises(ValueError, match=r"initial_peers: .* lacks the /p2p/<PeerID> part; copy the full address"):
        SwarmConfig(initial_peers=["/ip4/127.0.0.1/tcp/31337"])


@pytest.mark.parametrize("timeout", [0.0, -5.0])
def test_swarm_config_rejects_non_positive_startup_timeout(timeout: float) -> None:
    """startup_timeout must be positive, and the error names the field."""
    # Execute / Assert
    with pytest.raises(ValueError, match="startup_timeout must be > 0"):
        SwarmConfig(startup_timeout=timeout)


def test_unreachable_initial_peer_raises_swarm_error(identity_factory: IdentityFactory) -> None:
    """Joining through a peer nobody listens at raises SwarmError with a one-line message naming the address."""
    # Prepare
    absent = identity_factory(None)
    address = f"/ip4/127.0.0.1/tcp/1/p2p/{absent.peer_id}"
    config = SwarmConfig(host_maddrs=[LOCALHOST_MADDR], initial_peers=[address], startup_timeout=10)

    # Execute
    with pytest.raises(SwarmError) as info:
        start_dht(config, identity_factory(None))

    # Assert
    message = str(info.value)
    assert "\n" not in message
    assert "cannot reach any initial peer" in message
    assert address in message
