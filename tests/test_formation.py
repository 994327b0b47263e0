"""Declared group formation (node/secagg/formation.py, declared.py): nobody chooses a victim's group.

The partition is checked on its own (deterministic, order-free, sizes, and as likely to place a victim
with Sybils as a uniform draw, no more); the declarations are checked against forgeries; and peers on a
real DHT on 127.0.0.1 derive the same group, leaving out a peer that commits and withholds its secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
from hivemind.utils import MSGPackSerializer, get_dht_time
from secagg_harness import declared_formation

from dht import NodeIdentity
from node.aggregation.base import AggregationResult
from node.aggregation.secure import SecureAggregator
from node.config import AggregationConfig
from node.secagg.declared import DeclaredFormation
from node.secagg.formation import (
    MIN_SPAN_PATIENCE,
    DeclarationError,
    formation_seed,
    open_commitment,
    open_reveal,
    partition,
    seal_commitment,
    seal_reveal,
    span_patience,
    spans,
)

PEERS = [f"peer{i:02d}" for i in range(20)]


def test_every_peer_derives_the_same_groups_whatever_order_it_read_the_declarations_in() -> None:
    seed = os.urandom(32)
    shuffled = random.Random(1).sample(PEERS, len(PEERS))
    groups = partition(PEERS, seed, min_size=3, target=8)
    assert partition(shuffled, seed, min_size=3, target=8) == groups
    assert sorted(p for g in groups for p in g) == sorted(PEERS)
    assert [len(g) for g in groups] == [10, 10]  # 20 // 8 = 2 groups, each at least the target
    assert partition(PEERS, os.urandom(32), min_size=3, target=8) != groups  # another seed, another draw
    assert partition(PEERS[:2], seed, min_size=3) == []  # fewer than the minimum: no group
    by_hash = sorted(PEERS[:5], key=lambda peer: hashlib.sha256(seed + peer.encode()).digest())
    assert partition(PEERS[:5], seed, min_size=3) == [by_hash]  # one group below 2 x target, in H(seed, peer) order


def test_a_victim_lands_with_only_sybils_no_more_often_than_a_uniform_draw_gives() -> None:
    """12 peers, 6 of them Sybils, groups of 3: C(6, 2) / C(11, 2) = 0.273 of seeds put the victim with two."""
    victim, sybils = PEERS[0], set(PEERS[1:7])
    trials, hits = 3000, 0
    for _ in range(trials):
        groups = partition(PEERS[:12], os.urandom(32), min_size=3, target=3)
        mine = next(g for g in groups if victim in g)
        hits += set(mine) - {victim} <= sybils
    expected = math.comb(6, 2) / math.comb(11, 2)
    assert abs(hits / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_the_seed_depends_on_every_revealed_secret() -> None:
    secrets = {peer: os.urandom(32) for peer in PEERS[:5]}
    seed = formation_seed(7, 3, secrets)
    assert formation_seed(7, 3, dict(reversed(list(secrets.items())))) == seed
    for peer in secrets:
        assert formation_seed(7, 3, {**secrets, peer: os.urandom(32)}) != seed
    assert formation_seed(8, 3, secrets) != seed and formation_seed(7, 4, secrets) != seed


@pytest.fixture
def signer(identity_factory: Callable[[str | None], NodeIdentity]) -> tuple[NodeIdentity, Any]:
    identity = identity_factory(None)
    return identity, (identity.sign, identity.signing_public_key, identity.binding)


def test_a_commitment_and_its_reveal_open_for_the_round_and_slot_they_name(signer: tuple[NodeIdentity, Any]) -> None:
    identity, keys = signer
    secret = os.urandom(32)
    commitment = open_commitment(seal_commitment(identity.peer_id, 7, 3, secret, b"g", keys), identity.peer_id, 7, 3)
    assert commitment.gathered == b"g"
    assert open_reveal(seal_reveal(identity.peer_id, 7, 3, secret, identity.sign), commitment) == secret


def test_forged_or_misplaced_declarations_are_refused(
    signer: tuple[NodeIdentity, Any], identity_factory: Callable[[str | None], NodeIdentity]
) -> None:
    identity, keys = signer
    other = identity_factory(None)
    secret = os.urandom(32)
    sealed = seal_commitment(identity.peer_id, 7, 3, secret, b"g", keys)
    with pytest.raises(DeclarationError, match="stored under"):
        open_commitment(sealed, other.peer_id, 7, 3)  # a Sybil re-stores our commitment as its own
    with pytest.raises(DeclarationError, match="round 7 slot 3"):
        open_commitment(sealed, identity.peer_id, 7, 4)  # replayed into another slot
    with pytest.raises(DeclarationError, match="not bound"):  # our PeerID, another's signing key
        open_commitment(
            seal_commitment(
                identity.peer_id, 7, 3, secret, b"g", (other.sign, other.signing_public_key, other.binding)
            ),
            identity.peer_id,
            7,
            3,
        )
    with pytest.raises(DeclarationError, match="at most"):
        open_commitment(seal_commitment(identity.peer_id, 7, 3, secret, b"g" * 5000, keys), identity.peer_id, 7, 3)
    with pytest.raises(DeclarationError):
        open_commitment(msgpack.packb(["x", b"", b""]), identity.peer_id, 7, 3)
    commitment = open_commitment(sealed, identity.peer_id, 7, 3)
    with pytest.raises(DeclarationError, match="does not match"):
        open_reveal(seal_reveal(identity.peer_id, 7, 3, os.urandom(32), identity.sign), commitment)
    with pytest.raises(DeclarationError, match="does not verify"):
        open_reveal(seal_reveal(identity.peer_id, 7, 3, secret, other.sign), commitment)


class Withholder(DeclaredFormation):
    """A Sybil that commits and never reveals (to re-draw the partition once it has seen the others' secrets)."""

    async def _store(self, key: str, value: bytes, boundary: float) -> None:
        if not key.endswith("_reveal"):
            await super()._store(key, value, boundary)


def formation(peer: Any, cls: type[DeclaredFormation] = DeclaredFormation, window: float = 1.0) -> DeclaredFormation:
    return declared_formation(peer, "test_formation", cls, window)


def test_peers_on_a_real_dht_form_the_same_group_and_leave_out_a_peer_that_withholds(
    swarm_factory: Callable[..., list[Any]],
) -> None:
    peers = swarm_factory(5)
    serializer = MSGPackSerializer
    gathered = serializer.dumps([1e6, 0, serializer.dumps({"round": 5})])

    honest = [formation(peer) for peer in peers[:4]]
    sybil = formation(peers[4], Withholder)

    async def attempt() -> list[Any]:
        return await asyncio.gather(*(f.form(gathered) for f in [*honest, sybil]))

    # not asyncio.run: it would replace (and orphan, unclosed) the loop hivemind's futures made current here
    loop = asyncio.new_event_loop()
    try:
        first = loop.run_until_complete(attempt())
        second = loop.run_until_complete(attempt())
    finally:
        loop.close()
    assert first[:4] == [None] * 4  # a committed peer withheld its secret: nobody forms a group this slot
    assert all(f.withheld[5] == {peers[4].identity.peer_id} for f in honest)

    groups = second[:4]
    assert all(g is not None for g in groups)
    assert len({(g.group_id, g.peer_ids) for g in groups}) == 1  # every honest peer derived the same group
    assert sorted(str(p) for p in groups[0].peer_ids) == sorted(p.identity.peer_id for p in peers[:4])
    assert groups[0].gathered == (gathered,) * 4


def test_peers_ready_a_little_after_another_join_its_slot(swarm_factory: Callable[..., list[Any]]) -> None:
    """Peer 0 is ready 0.2 W into a slot, peers 1 and 2 at 0.65 W, when the next boundary is 0.35 W away: under
    the fixed grid they would declare in the slot after (each slot then below the minimum of 3, no group);
    they see peer 0's commitment and join its slot, and all three form one group."""
    peers = swarm_factory(3)
    window = 2.0
    gathered = MSGPackSerializer.dumps([1e6, 0, MSGPackSerializer.dumps({"round": 9})])
    formations = [formation(peer, window=window) for peer in peers]

    async def ready_at(f: DeclaredFormation, phase: float) -> Any:
        now = get_dht_time()
        start = (now // window + 1) * window + phase * window  # the next slot's start, plus the phase
        await asyncio.sleep(start - now)
        return await f.form(gathered)

    async def attempt() -> list[Any]:
        return await asyncio.gather(
            ready_at(formations[0], 0.2), ready_at(formations[1], 0.65), ready_at(formations[2], 0.65)
        )

    loop = asyncio.new_event_loop()  # not asyncio.run (see above)
    try:
        groups = loop.run_until_complete(attempt())
    finally:
        loop.close()
    assert all(g is not None for g in groups), groups
    assert len({(g.group_id, g.peer_ids) for g in groups}) == 1


def test_a_cross_cohort_slot_forms_once_it_spans_two_cohorts_or_has_waited() -> None:
    one, two = [("a", 2)] * 3, [("a", 2), ("a", 2), ("b", 2)]
    assert not spans(one, [0, 0, 0], 2)  # one cohort of a two-cohort run: wait
    assert not spans(one, [0, 1, 0], 2)
    assert spans(two, [0, 0, 0], 2)
    assert spans(one, [0, 2, 0], 2)  # somebody has waited long enough: form without the other cohort
    assert spans([("a", 1)] * 3, [0, 0, 0], 2)  # the run has one cohort
    assert spans([None] * 3, [0, 0, 0], 2)  # no cohorts declared (a run without cohorts, a cohort ring)
    assert spans([("a", 2), None, ("a", 2)], [0, 0, 0], 2)  # a peer that declares none does not hold the others
    assert [span_patience(3.0, t) for t in (6.0, 20.0, 120.0)] == [MIN_SPAN_PATIENCE, 3, 8]  # half the timeout


def _form_until_grouped(formations: list[DeclaredFormation], gathered: list[bytes], starts: list[float]) -> list[Any]:
    """Each formation tries slot after slot (as hivemind's step does) from its start, in DHT time, until it is
    grouped (at most 5 tries each)."""

    async def tries(f: DeclaredFormation, data: bytes, start: float) -> Any:
        await asyncio.sleep(max(0.0, start - get_dht_time()))
        for _ in range(5):
            group = await f.form(data)
            if group is not None:
                return group
        return None

    async def attempt() -> list[Any]:
        return await asyncio.gather(*(tries(*args) for args in zip(formations, gathered, starts, strict=True)))

    loop = asyncio.new_event_loop()  # not asyncio.run (see above)
    try:
        return loop.run_until_complete(attempt())
    finally:
        loop.close()


def _cross_cohort_gather(round_no: int, cohort: str) -> bytes:
    return MSGPackSerializer.dumps(
        [1e6, 0, MSGPackSerializer.dumps({"round": round_no, "cohort": cohort, "cohorts": 2})]
    )


def test_a_cohort_done_a_slot_early_waits_and_one_group_spans_both_cohorts(
    swarm_factory: Callable[..., list[Any]],
) -> None:
    """Cohort a (3 peers) is ready a slot before cohort b (3 peers). Enough for a group alone, a used to form one
    and the cross-cohort round mixed nothing; now it declines that slot, and all six form one group in the next."""
    peers = swarm_factory(6)
    window = 2.0
    formations = [formation(peer, window=window) for peer in peers]
    gathered = [_cross_cohort_gather(4, "ab"[i // 3]) for i in range(6)]
    first = (get_dht_time() // window + 1) * window + 0.2 * window
    groups = _form_until_grouped(formations, gathered, [first] * 3 + [first + window] * 3)
    assert all(g is not None for g in groups), groups
    assert len({(g.group_id, g.peer_ids) for g in groups}) == 1
    assert len(groups[0].peer_ids) == 6
    assert [f.waited.get(4, 0) for f in formations] == [1, 1, 1, 0, 0, 0]


def test_a_cohort_alone_forms_without_the_other_after_waiting_its_patience(
    swarm_factory: Callable[..., list[Any]],
) -> None:
    peers = swarm_factory(3)
    formations = [formation(peer, window=1.0) for peer in peers]
    groups = _form_until_grouped(formations, [_cross_cohort_gather(6, "a")] * 3, [get_dht_time()] * 3)
    assert all(g is not None and len(g.peer_ids) == 3 for g in groups), groups
    assert [f.waited[6] for f in formations] == [MIN_SPAN_PATIENCE] * 3  # the harness's default patience


def _aggregate_all(
    aggregators: list[SecureAggregator], round_no: int, updates: list[list[torch.Tensor]]
) -> list[AggregationResult | None]:
    """Every aggregator's ``aggregate`` of ``round_no`` at once, from threads (as trainers do)."""
    results: list[AggregationResult | None] = [None] * len(aggregators)

    def step(i: int) -> None:
        results[i] = aggregators[i].aggregate(round_no, updates[i], 16.0)

    threads = [threading.Thread(target=step, args=(i,)) for i in range(len(aggregators))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


@pytest.mark.slow
def test_declared_groups_average_and_a_matchmaking_leader_cannot_gather_a_declared_peer(
    swarm_factory: Callable[..., list[Any]],
) -> None:
    """Four peers with formation = "declared" average in the group they all derive, round after round; two
    Sybils that run hivemind's matchmaking beside them (a leader gathering followers) never get one of them."""
    peers = swarm_factory(6)
    declared = AggregationConfig(
        min_group_size=3, matchmaking_time=1.0, timeout=40.0, group_rounds=1, formation="declared"
    )
    leader = AggregationConfig(
        min_group_size=3, matchmaking_time=1.0, timeout=15.0, group_rounds=1, formation="matchmaking"
    )
    template = [torch.zeros(50)]
    honest = [SecureAggregator(p.dht, "formed", template, declared, p.identity, weight_bound=16.0) for p in peers[:4]]
    sybils = [SecureAggregator(p.dht, "formed", template, leader, p.identity, weight_bound=16.0) for p in peers[4:]]
    try:
        for round_no in (1, 2):
            updates = [[torch.full((50,), float(i) / 10)] for i in range(6)]
            results = _aggregate_all([*honest, *sybils], round_no, updates)
            honest_ids = sorted(p.identity.peer_id for p in peers[:4])
            for i, result in enumerate(results[:4]):
                assert result is not None and sorted(result.peers) == honest_ids, f"round {round_no}: {result}"
                assert torch.allclose(updates[i][0], torch.full((50,), 0.15), atol=1e-6)  # mean of 0, .1, .2, .3
            assert len({r.group_id for r in results[:4] if r is not None}) == 1
            assert results[4:] == [None, None]  # the leaders gathered nobody
    finally:
        for aggregator in [*honest, *sybils]:
            aggregator.shutdown()
