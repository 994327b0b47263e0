"""Kept groups (node/secagg/kept_group.py): one matchmaking, then a fresh masked all-reduce every round.

Real DHT peers and SecureAggregators on 127.0.0.1, real crypto.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
from secagg_harness import aggregate_together

from node.aggregation.base import AggregationResult
from node.aggregation.secure import SecureAggregator
from node.config import AggregationConfig, ConfigError, load_node_config
from node.secagg.kept_group import round_group_id

if TYPE_CHECKING:
    from conftest import SwarmPeer

pytestmark = pytest.mark.slow


def _inputs(n: int, seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(300, generator=generator) / 8, torch.randn(7, generator=generator) / 8] for _ in range(n)]


def _mean(updates: list[list[torch.Tensor]], weights: list[float], k: int) -> torch.Tensor:
    return sum(w * u[k].double() for w, u in zip(weights, updates, strict=True)) / sum(weights)


def test_group_rounds_is_checked_in_the_config() -> None:
    with pytest.raises(ConfigError, match=r"aggregation.group_rounds must be in \[1, 10000\], got 0"):
        load_node_config(None, {"run.aggregation.group_rounds": 0})
    assert AggregationConfig().group_rounds >= 1


def test_a_kept_group_runs_rounds_without_matchmaking_and_re_keys_every_round(
    swarm_factory: Callable[..., list[SwarmPeer]],
) -> None:
    """Rounds 1 and 2 run in the group that matchmaking formed for round 0, under ids every member
    derives from it; each round every member's keys are new; after ``group_rounds`` the peers match again."""
    config = AggregationConfig(min_group_size=3, matchmaking_time=1.0, timeout=60.0, group_rounds=3)
    peers = swarm_factory(3)
    weights = [16.0, 32.0, 48.0]
    aggregators = [
        SecureAggregator(peer.dht, "kept", _inputs(1, 0)[0], config, peer.identity, weight_bound=64.0) for peer in peers
    ]
    seen: list[list[AggregationResult]] = []
    try:
        for round_no in range(4):
            updates = _inputs(3, seed=round_no)
            originals = [[t.clone() for t in update] for update in updates]
            results = aggregate_together(aggregators, round_no, updates, weights)
            assert all(r is not None and r.group_size == 3 for r in results), f"round {round_no}: {results}"
            for k in range(2):
                expected = _mean(originals, weights, k)
                assert all(torch.allclose(u[k].double(), expected, atol=1e-6) for u in updates)
            seen.append([r for r in results if r is not None])
    finally:
        for aggregator in aggregators:
            aggregator.shutdown()

    assert [[r.group_round for r in results] for results in seen] == [[0] * 3, [1] * 3, [2] * 3, [0] * 3]
    ids = [{r.group_id for r in results} for results in seen]
    assert all(len(group) == 1 for group in ids), "the members of a round disagree on its group id"
    origin = bytes.fromhex(next(iter(ids[0])))
    assert next(iter(ids[1])) == round_group_id(origin, 1).hex()  # derived, not matched
    assert next(iter(ids[2])) == round_group_id(origin, 2).hex()
    assert next(iter(ids[3])) not in {round_group_id(origin, 3).hex(), *ids[0]}  # matched again
    for results in seen:  # every member received the same keys from everyone
        assert len({r.key_fingerprints for r in results}) == 1 and len(results[0].key_fingerprints) == 3
    fingerprints = [f for results in seen for f in results[0].key_fingerprints]
    assert len(set(fingerprints)) == len(fingerprints) == 12, "a round key was reused"


def test_a_member_that_leaves_ends_the_kept_group(swarm_factory: Callable[..., list[SwarmPeer]]) -> None:
    """A kept round that a member misses still averages the others (it drops out); the next round matches again."""
    config = AggregationConfig(
        min_group_size=3, matchmaking_time=1.0, timeout=60.0, message_timeout=3.0, group_rounds=10
    )
    peers = swarm_factory(4)
    weights = [16.0, 16.0, 16.0, 16.0]
    aggregators = [
        SecureAggregator(peer.dht, "leave", _inputs(1, 0)[0], config, peer.identity, weight_bound=64.0)
        for peer in peers
    ]
    try:
        first = aggregate_together(aggregators, 0, _inputs(4, seed=1), weights)
        assert all(r is not None and r.group_size == 4 for r in first), first
        aggregators.pop().shutdown()
        stayed = aggregators
        second = aggregate_together(stayed, 1, _inputs(3, seed=2), weights[:3])
        third = aggregate_together(stayed, 2, _inputs(3, seed=3), weights[:3])
    finally:
        for aggregator in aggregators:
            aggregator.shutdown()
    assert all(r is not None and r.group_size == 3 and r.group_round == 1 for r in second), second
    assert all(r is not None and r.group_size == 3 and r.group_round == 0 for r in third), third
    assert second[0] is not None and third[0] is not None
    origin = bytes.fromhex(first[0].group_id) if first[0] is not None else b""
    assert third[0].group_id != round_group_id(origin, 2).hex()
