"""The endpoint's waiting queue under flooding: what is checked before a message may wait, and how much may wait.

Real libp2p peers on 127.0.0.1 for the endpoint; the waiting room's eviction rule is pinned directly.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from secagg_harness import SecAggSwarm

from node.secagg.messages import NO_BOUND, Message, MessageError
from node.secagg.protocol import SecAggResult
from node.secagg.state import SecAggTimeouts
from node.secagg.waiting_room import WaitingRoom

NUMEL = 801
WAIT_FOR_GROUP = 10.0  # how long a message may wait for its group here (long enough to outlast the flood)
PER_PEER, GROUPS_PER_PEER = 8, 4  # the endpoint's defaults
STREAM_ATTEMPTS = 3


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecAggSwarm]:
    """Five real P2P peers whose endpoints let a message wait WAIT_FOR_GROUP seconds for its group."""
    peers = SecAggSwarm(Path(tmp_path_factory.mktemp("endpoint")), size=5, wait_for_group=WAIT_FOR_GROUP)
    try:
        yield peers
    finally:
        peers.close()


def keys_header(swarm: SecAggSwarm, sender: int, group: bytes, sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """A keys message from swarm peer ``sender`` for ``group``, signed by its identity (or by ``sign``)."""
    identity = swarm.identities[sender]
    data = {
        "c_pk": bytes(PrivateKey.generate().public_key),
        "s_pk": bytes(PrivateKey.generate().public_key),
        "b_commit": os.urandom(32),
        "signing_pk": identity.signing_public_key,
        "binding": identity.binding,
        "bound_exp": NO_BOUND,
    }
    return Message("keys", group, 1, 0, 1, data).seal(sign or identity.sign)


async def send_raw(swarm: SecAggSwarm, sender: int, recipient: int, header: bytes) -> tuple[bool, str]:
    """The header on a stream from ``sender`` to ``recipient``'s endpoint, and its [ok, reason] reply.

    p2pd now and then resets a fresh stream under load (MaskedAllReduce retries too): up to 3 streams.
    """
    for attempt in range(STREAM_ATTEMPTS):
        try:
            return await swarm.exchange(sender, recipient, header)
        except (asyncio.IncompleteReadError, ConnectionError):
            if attempt + 1 == STREAM_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def until(condition: Callable[[], bool], timeout: float) -> None:
    """Wait (polling the endpoint's state, bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition never held")
        await asyncio.sleep(0.02)


def test_headers_that_fail_their_signature_never_wait(swarm: SecAggSwarm) -> None:
    """For a group not started here, a bad signature, a key bound to another PeerID or an unknown signer: refused."""
    group = os.urandom(32)
    stranger = SigningKey.generate()
    headers = {
        "bad signature": keys_header(swarm, 4, group, sign=lambda body: stranger.sign(body).signature),
        "bound to another peer": keys_header(swarm, 1, group),  # peer 1's binding, sent on peer 4's stream
        "unknown signer": Message("claim", group, 1, 0, 1, {"attempt": 0, "holders": [0], "maskset": [0]}).seal(
            swarm.identities[4].sign
        ),
    }

    replies = {name: swarm.send_raw(4, 3, header) for name, header in headers.items()}

    assert not any(ok for ok, _ in replies.values())
    assert "bad signature" in replies["bad signature"][1]
    assert "not bound" in replies["bound to another peer"][1]
    assert "unknown signer" in replies["unknown signer"][1]
    assert swarm.endpoints[3].room.waiting() == 0


def test_a_flood_from_one_peer_leaves_an_honest_round_intact(swarm: SecAggSwarm) -> None:
    """Peer 4 floods peer 3 with signed, unsigned and misbound keys for fake groups while the others' keys
    wait for peer 3's group: the flood takes at most its per-peer share, and the honest round still succeeds."""
    n, victim, attacker = 4, 3, 4
    rng = np.random.default_rng(5)
    vectors = [(rng.standard_normal(NUMEL) * 0.3).astype(np.float32) for _ in range(n)]
    sessions = swarm.sessions(vectors, timeouts=SecAggTimeouts(message=20.0, data=30.0), unregistered=(victim,))
    endpoint = swarm.endpoints[victim]
    stranger = SigningKey.generate()
    flood = (
        [keys_header(swarm, attacker, os.urandom(32)) for _ in range(120)]  # signed, each for a fake group
        + [keys_header(swarm, attacker, os.urandom(32), sign=lambda b: stranger.sign(b).signature) for _ in range(40)]
        + [keys_header(swarm, 0, os.urandom(32)) for _ in range(40)]  # a binding of another PeerID
    )
    honest = [str(p.peer_id) for p in swarm.p2ps[:victim]]
    flooder = str(swarm.p2ps[attacker].peer_id)

    async def scenario() -> tuple[dict[str, int], int, list[Any], list[Any]]:
        running = [asyncio.ensure_future(session.run()) for session in sessions[:victim]]
        await until(lambda: all(endpoint.room.waiting(h) == 1 for h in honest), 20)  # their keys wait for peer 3
        sending = [asyncio.ensure_future(send_raw(swarm, attacker, victim, header)) for header in flood]
        await until(lambda: sum(s.done() for s in sending) >= len(sending) - GROUPS_PER_PEER, 60)
        held = {h: endpoint.room.waiting(h) for h in honest}
        flooded = endpoint.room.waiting(flooder)
        endpoint.register(sessions[victim])
        running.append(asyncio.ensure_future(sessions[victim].run()))
        outcomes = await asyncio.gather(*running, return_exceptions=True)
        replies = await asyncio.gather(*sending, return_exceptions=True)
        return held, flooded, outcomes, replies

    try:
        held, flooded, outcomes, replies = swarm.call(scenario(), timeout=120)
    finally:
        for session, peer_endpoint in zip(sessions, swarm.endpoints, strict=False):
            peer_endpoint.unregister(session)

    assert held == dict.fromkeys(honest, 1), "the flood evicted an honest peer's early keys"
    assert flooded <= GROUPS_PER_PEER
    for outcome in outcomes:
        assert isinstance(outcome, SecAggResult), f"an honest peer failed: {outcome!r}"
        assert outcome.contributors == tuple(range(n))
    broken = [r for r in replies if isinstance(r, BaseException)]
    assert all(isinstance(r, asyncio.IncompleteReadError | ConnectionError) for r in broken), broken[:3]
    answered = [r for r in replies if not isinstance(r, BaseException)]
    assert len(answered) >= len(flood) // 2 and not any(ok for ok, _ in answered)
    assert endpoint.room.waiting() == 0


def test_one_sender_is_bounded_in_messages_and_groups() -> None:
    """Per sender: at most per_peer messages and groups_per_peer groups wait; more are refused with a reason."""
    room = WaitingRoom(total=100, per_peer=3, groups_per_peer=2)
    room.enter("a", b"g1")
    room.enter("a", b"g2")
    with pytest.raises(MessageError, match="2 groups"):
        room.enter("a", b"g3")
    room.enter("a", b"g1")
    with pytest.raises(MessageError, match="3 messages"):
        room.enter("a", b"g1")

    assert room.waiting("a") == 3 and room.waiting() == 3


def test_a_full_room_evicts_the_biggest_holder_never_a_lone_honest_message() -> None:
    """Sybils filling the total bound evict each other's oldest messages, never the honest peer's single one."""
    room = WaitingRoom(total=6, per_peer=3, groups_per_peer=3)
    honest = room.enter("honest", b"real")
    sybils = [room.enter(f"sybil{k}", bytes([k, i])) for k in range(2) for i in range(2)]  # 5 waiting
    room.enter("sybil0", b"x")  # 6: full

    newcomer = room.enter("sybil2", b"y")  # evicts sybil0's oldest (it holds the most)

    assert not honest.evicted and room.waiting("honest") == 1
    assert sybils[0].evicted and sybils[0].wake.is_set()
    assert room.waiting() == 6 and room.evictions == 1
    with pytest.raises(MessageError, match="already wait"):
        room.enter("sybil2", b"z")  # the most anyone holds (2) is what sybil2 would hold: refused, nobody evicted
    assert not honest.evicted and room.evictions == 1
    room.leave(newcomer)
    room.leave(newcomer)  # twice is harmless
    assert room.waiting("sybil2") == 0 and room.waiting() == 5
