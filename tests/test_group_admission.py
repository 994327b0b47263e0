"""Who may share a secure group: `aggregation.allowlist`, against a peer outside it that tries to join.

Real DHT peers and SecureAggregators on 127.0.0.1, real matchmaking and crypto.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch

from node.aggregation.base import AggregationResult
from node.aggregation.secure import SecureAggregator
from node.config import AggregationConfig, ConfigError, load_node_config

if TYPE_CHECKING:
    from conftest import SwarmPeer


def test_the_allowlist_is_checked_in_the_config() -> None:
    with pytest.raises(ConfigError, match=r"aggregation.allowlist must be a list of at most .* base58 PeerIDs"):
        load_node_config(None, {"run.aggregation.allowlist": ["not a peer id"]})
    with pytest.raises(ConfigError, match=r"aggregation.allowlist needs aggregation.mode = 'secure'"):
        load_node_config(None, {"run.aggregation.mode": "plain", "run.aggregation.allowlist": ["12D3KooW" + "x" * 44]})


@pytest.mark.slow
def test_a_peer_outside_the_allowlist_never_enters_a_group(swarm_factory: Callable[..., list[SwarmPeer]]) -> None:
    """Three allowlisted peers average among themselves; a fourth, outside the list and admitting
    anyone itself, tries the same rounds and is in no group (leaders refuse it, followers do not ask it)."""
    peers = swarm_factory(4)
    allowed = [str(peer.dht.peer_id) for peer in peers[:3]]
    closed = AggregationConfig(min_group_size=3, matchmaking_time=1.5, timeout=8.0, allowlist=allowed, group_rounds=1)
    open_config = AggregationConfig(min_group_size=3, matchmaking_time=1.5, timeout=8.0, group_rounds=1)
    template = [torch.zeros(50)]
    aggregators = [
        SecureAggregator(peer.dht, "gate", template, config, peer.identity, weight_bound=64.0)
        for peer, config in zip(peers, [closed, closed, closed, open_config], strict=True)
    ]
    outcomes: list[list[AggregationResult | None]] = []
    try:
        for round_no in range(4):  # until 2 rounds formed: a loaded machine may miss one matchmaking window
            updates = [[torch.full((50,), float(i) / 10)] for i in range(4)]
            results: list[AggregationResult | None] = [None] * 4

            def step(i: int, round_no: int = round_no, updates: list = updates, results: list = results) -> None:
                results[i] = aggregators[i].aggregate(round_no, updates[i], 16.0)

            threads = [threading.Thread(target=step, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            outcomes.append(results)
            if results[3] is None:
                assert torch.equal(updates[3][0], torch.full((50,), 0.3))  # the outsider's tensors are untouched
            if sum(all(r is not None for r in rows[:3]) for rows in outcomes) == 2:
                break
    finally:
        for aggregator in aggregators:
            aggregator.shutdown()

    outsider = str(peers[3].dht.peer_id)
    formed = [results for results in outcomes if all(r is not None for r in results[:3])]
    assert len(formed) == 2, outcomes
    for results in outcomes:
        assert results[3] is None, f"the outsider got into a group: {results[3]}"
        for result in results[:3]:
            assert result is None or (result.group_size == 3 and outsider not in result.peers), result
