"""Group testing against a masked poisoner (node/secagg/suspicion.py): small, unkept groups after a rejection,
suspects named from a node's own verdicts, and a peer left out of the partition only when enough other declarers
name it.

The rules are checked on their own, then driven the way a swarm drives them (declared formation's partition under
fresh seeds, every honest member's gate rejecting the groups a poisoner is in), then on a real DHT on 127.0.0.1:
every declared peer, the named one included, derives the same partition without it; and last in a real swarm of
`zen-node join` processes with a poisoner among them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO_ROOT, NodeProcess, domain_texts, write_run_config
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer
from secagg_harness import aggregate_together, declared_formation

from node.aggregation.base import AggregationResult, AloneThisRound
from node.aggregation.secure import SecureAggregator
from node.config import AggregationConfig
from node.secagg.declared import DeclaredFormation
from node.secagg.formation import SITTING_OUT, partition, split_partition
from node.secagg.kept_group import KeptGroup
from node.secagg.suspicion import MAX_SUSPECTS, Suspicion, asks_split, excluded, suspects_of, votes_needed

MIN_SIZE = 3
POISON_MEAN = [sys.executable, str(REPO_ROOT / "tests" / "deviant_node.py"), "poison-mean"]


def test_a_peer_is_named_only_when_the_verdicts_single_it_out() -> None:
    s = Suspicion("me")
    s.note(1, ["me", "a", "b", "p"], accepted=False)
    s.note(2, ["me", "b", "p"], accepted=False)
    assert s.suspects() == [] and s.split()  # b and p tie (2 rejections each)
    s.note(3, ["me", "a", "c"], accepted=True)
    assert s.suspects() == []  # b and p tie (2 rejections each)
    s.note(4, ["me", "p", "d"], accepted=False)
    assert s.suspects() == ["p"] and s.gathered() == {"suspects": ["p"]}  # p explains our rejections: no split
    s.note(5, ["me", "a", "b"], accepted=True)
    assert s.suspects() == ["p"] and s.gathered() == {"suspects": ["p"]}  # b is cleared, p stays named
    s.note(6, ["me", "p", "a"], accepted=True)
    assert s.suspects() == [] and s.gathered() == {"split": 1}  # p cleared: round 4's rejection is unexplained again
    s.note(7, ["me", "a", "d"], accepted=True)
    s.note(8, ["me", "a", "d"], accepted=True)
    assert s.gathered() == {}  # no rejection in the last SPLIT_ROUNDS


def test_a_poisoner_that_behaved_at_first_is_still_named() -> None:
    s = Suspicion("me")
    s.note(1, ["me", "a", "b", "p"], accepted=True)  # its first round was honest
    s.note(2, ["me", "a", "p"], accepted=False)
    assert s.suspects() == []  # p alone at 1 rejection: not yet
    s.note(3, ["me", "b", "p"], accepted=False)
    assert s.suspects() == ["p"]  # 2 against a's and b's 1 each, and no group accepted with it since


def test_a_declarations_suspects_are_bounded_and_checked() -> None:
    assert suspects_of({"suspects": ["a", "b"]}) == {"a", "b"}
    assert suspects_of({}) == frozenset()
    for bad in ("a", ["a"] * (MAX_SUSPECTS + 1), [1], ["x" * 65], [""], {"a": 1}):
        assert suspects_of({"suspects": bad}) == frozenset(), bad
    assert asks_split({"split": 1}) and not asks_split({"split": 0}) and not asks_split({})


def test_one_voter_or_a_self_vote_excludes_nobody() -> None:
    assert [votes_needed(n) for n in (3, 6, 7, 30)] == [2, 2, 3, 10]
    assert excluded({"p": frozenset({"a"}), "a": frozenset(), "b": frozenset(), "c": frozenset()}) == {}
    assert excluded({"p": frozenset({"p"}), "a": frozenset({"p"}), "b": frozenset()}) == {}  # p's own vote
    assert excluded({"p": frozenset({"a"}), "a": frozenset({"p"}), "b": frozenset({"p"})}) == {"p": 2}
    assert excluded({"a": frozenset({"zz"}), "b": frozenset({"zz"})}) == {}  # only declared peers are left out


def test_a_member_that_rejected_its_groups_mean_leaves_the_kept_group() -> None:
    from hivemind.averaging.group_info import GroupInfo

    gathered = MSGPackSerializer.dumps([1e6, 0, MSGPackSerializer.dumps({"round": 4})])
    kept = KeptGroup(GroupInfo(b"g" * 32, (PeerID(b"x" * 34),), (gathered,)), round_no=4, uses=1)
    assert kept.next_round(5, 8, MSGPackSerializer) is not None
    assert kept.next_round(5, 8, MSGPackSerializer, split=True) is None


def _simulate(
    peers: list[str], poisoner: str, rounds: int, honest_rounds: int
) -> tuple[list[dict[str, int]], dict[str, Suspicion]]:
    """Rounds of declared formation's partition (fresh seeds) with every honest member's gate rejecting the groups
    ``poisoner`` is in from round ``honest_rounds`` on; the poisoner names honest peers every round. Returns each
    round's exclusions and the honest nodes' trackers."""
    nodes = {peer: Suspicion(peer) for peer in peers if peer != poisoner}
    history = []
    for round_no in range(rounds):
        named = {peer: frozenset(node.suspects()) for peer, node in nodes.items()}
        named[poisoner] = frozenset(peers[:MAX_SUSPECTS])  # it lies: names honest peers
        left_out = excluded(named)
        history.append(left_out)
        split = any(node.split() for node in nodes.values())
        seed = hashlib.sha256(round_no.to_bytes(4, "big")).digest()
        members = [peer for peer in peers if peer not in left_out]
        groups = split_partition(members, seed, MIN_SIZE)[0] if split else partition(members, seed, MIN_SIZE)
        for group in groups:
            for peer in group:
                if peer in nodes:
                    nodes[peer].note(round_no, group, accepted=poisoner not in group or round_no < honest_rounds)
    return history, nodes


@pytest.mark.parametrize("count", [4, 5, 6, 7, 9, 12])
@pytest.mark.parametrize("honest_rounds", [0, 1, 3])
def test_honest_nodes_single_out_a_poisoner_and_never_each_other(count: int, honest_rounds: int) -> None:
    peers = [f"peer{i:02d}" for i in range(count)]
    poisoner = peers[-1]
    history, nodes = _simulate(peers, poisoner, rounds=24, honest_rounds=honest_rounds)
    assert all(set(left_out) <= {poisoner} for left_out in history), history  # no honest peer is ever left out
    first = next(i for i, left_out in enumerate(history) if left_out)
    # a slot too small for two groups sits peers out instead: a node needs two rejected groups with different
    # partners of the poisoner, so naming takes longer (5-19 rounds over 8 seed sequences at 4 peers)
    assert first <= honest_rounds + (10 if count >= 2 * MIN_SIZE else 20), (first, history)
    assert all(poisoner in left_out for left_out in history[first:]), history  # and it stays out
    for node in nodes.values():
        assert set(node.suspects()) <= {poisoner}
        assert not node.split()  # the last rounds, without the poisoner, were accepted


def _form(formations: list[DeclaredFormation], gathered: list[bytes]) -> list[Any]:
    async def attempt() -> list[Any]:
        return await asyncio.gather(*(f.form(g) for f, g in zip(formations, gathered, strict=True)))

    loop = asyncio.new_event_loop()  # not asyncio.run: it would orphan the loop hivemind's futures made current
    try:
        return loop.run_until_complete(attempt())
    finally:
        loop.close()


def _gather(round_no: int, **extra: Any) -> bytes:
    return MSGPackSerializer.dumps([1e6, 0, MSGPackSerializer.dumps({"round": round_no, **extra})])


def test_on_a_real_dht_a_split_slot_forms_small_groups_and_a_named_peer_is_left_out(
    swarm_factory: Callable[..., list[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    peers = swarm_factory(6)
    ids = [peer.identity.peer_id for peer in peers]
    formations = [declared_formation(peer, "test_suspicion") for peer in peers]

    # one declarer asks to split: six peers form two groups of three, the same two on every peer
    groups = _form(formations, [_gather(3, split=1)] + [_gather(3)] * 5)
    assert all(g is not None for g in groups), groups
    assert len({(g.group_id, g.peer_ids) for g in groups}) == 2
    assert sorted(len(g.peer_ids) for g in groups) == [3] * 6
    assert all(list(f.split_groups) == [g.group_id] for f, g in zip(formations, groups, strict=True))  # not kept

    # two declarers name peer 5 (which names peer 0 back): every peer, peer 5 included, leaves it out
    named = {"suspects": [ids[5]]}
    gathered = [_gather(4, **named), _gather(4, **named)] + [_gather(4)] * 3 + [_gather(4, suspects=[ids[0]])]
    groups = _form(formations, gathered)
    assert groups[5] is None
    assert len({(g.group_id, g.peer_ids) for g in groups[:5]}) == 1
    assert sorted(map(str, groups[0].peer_ids)) == sorted(ids[:5])
    assert groups[0].group_id not in formations[0].split_groups  # no split asked: the group may be kept
    assert f"{ids[5]} is left out of the groups: named a suspect by 2 of the 6 declared peers" in caplog.text


def test_on_a_real_dht_a_split_slot_too_small_for_two_groups_sits_a_peer_out(
    swarm_factory: Callable[..., list[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.secagg.declared")
    peers = swarm_factory(4)
    ids = [peer.identity.peer_id for peer in peers]
    formations = [declared_formation(peer, "test_sit_out") for peer in peers]

    # one of four asks to split: three form a group, the fourth sits the round out (its own "group" of itself)
    groups = _form(formations, [_gather(3, split=1)] + [_gather(3)] * 3)
    resting = [i for i, g in enumerate(groups) if g is not None and g.group_id == SITTING_OUT]
    formed = {(g.group_id, g.peer_ids) for i, g in enumerate(groups) if i not in resting}
    assert len(resting) == 1 and len(formed) == 1, groups
    assert groups[resting[0]].peer_ids == (ids[resting[0]],)
    members = next(iter(formed))[1]
    assert len(members) == 3 and ids[resting[0]] not in members
    assert "we sit this split round out (4 declared)" in caplog.text

    # a suspect that enough others name is left out: the other three form one group, nobody else sits out
    named = {"suspects": [ids[3]]}
    groups = _form(formations, [_gather(4, split=1, **named), _gather(4, **named), _gather(4), _gather(4)])
    assert groups[3] is None
    assert len({(g.group_id, g.peer_ids) for g in groups[:3]}) == 1 and groups[0].group_id != SITTING_OUT


def test_the_peer_a_split_slot_of_four_sits_out_ends_its_round_at_once_and_the_other_three_average(
    swarm_factory: Callable[..., list[Any]],
) -> None:
    """Four real secure aggregators, one of which rejected its last group's mean (so it asks to split): three
    average together, and the fourth's step ends with ``AloneThisRound`` (its trainer trains alone at once)."""
    peers = swarm_factory(4)
    config = AggregationConfig(min_group_size=3, matchmaking_time=1.0, timeout=60.0, formation="declared")
    aggregators = [SecureAggregator(p.dht, "sit_out", [torch.zeros(40)], config, p.identity, 16.0) for p in peers]
    ids = [str(p.identity.peer_id) for p in peers]
    aggregators[0].verdict(AggregationResult(round=0, group_size=4, peers=tuple(ids)), accepted=False)
    started = time.monotonic()
    try:
        outcomes = aggregate_together(aggregators, 1, [[torch.full((40,), 0.1 * i)] for i in range(4)], [8.0] * 4, True)
    finally:
        for aggregator in aggregators:
            aggregator.shutdown()
    resting = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, AloneThisRound)]
    assert len(resting) == 1 and "sit this round out" in str(outcomes[resting[0]]), outcomes
    results = [outcome for i, outcome in enumerate(outcomes) if i != resting[0]]
    assert all(isinstance(r, AggregationResult) and r.group_size == 3 for r in results), outcomes
    assert ids[resting[0]] not in results[0].peers and len({r.peers for r in results}) == 1
    assert time.monotonic() - started < config.timeout  # nobody waited out the round's timeout


@pytest.mark.slow
def test_honest_nodes_name_a_poisoner_leave_it_out_and_average_again(tmp_path: Path, bootstrap_maddr: str) -> None:
    """Five honest `zen-node join` processes and one that sends +-clip_bound in every coordinate from its second
    round (tests/deviant_node.py poison-mean), on real text: the honest gates reject its groups, the slots split,
    the honest nodes name it and every peer leaves it out; their last rounds average in a group of the five."""
    # Prepare
    config = write_run_config(
        tmp_path / "run.toml", run_id="suspects", aggregation={"matchmaking_time": 1.0, "group_rounds": 2}
    )
    corpus = domain_texts()["drama"]
    args = ("--rounds", "16", "--min-peers", "6")
    honest = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, corpus, 5, *args)
    poisoner = NodeProcess(
        tmp_path, "poisoner", config, bootstrap_maddr, corpus[100_000:120_000], *args, program=POISON_MEAN
    )

    # Execute
    try:
        codes = [node.wait(timeout=420) for node in honest]  # the poisoner, left out, never finishes its rounds
    finally:
        for node in [*honest, poisoner]:
            node.stop()

    # Assert
    assert codes == [0] * 5, [node.tail() for node in honest]
    joined = re.search(r"joined run \S+ as (\S+) at round", poisoner.output())
    assert joined is not None and "deviant: sending" in poisoner.output(), poisoner.tail()
    culprit = joined.group(1)
    named = [f"{culprit} was in" in node.output() and "naming it a suspect" in node.output() for node in honest]
    assert sum(named) >= 2, [node.tail() for node in honest]
    for node in honest:
        output = node.output()
        assert f"{culprit} is left out of the groups" in output, node.tail()
        left_out = set(re.findall(r"(\S+) is left out of the groups", output))
        assert left_out == {culprit}, left_out  # never an honest peer
        assert "we are left out" not in output and "Traceback" not in output
        last = node.reports()[-3:]
        assert [(r["mode"], r["group_size"]) for r in last] == [("group", 5)] * 3, node.reports()
