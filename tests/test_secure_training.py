"""Secure aggregation in the node: hivemind matchmaking plus the masked all-reduce, and training through it."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from helpers import ZEN_NODE

from node.aggregation.base import AggregationResult
from node.aggregation.secure import SecureAggregator
from node.config import AggregationConfig, ConfigError, load_node_config

if TYPE_CHECKING:
    from conftest import SwarmPeer


def test_secure_mode_refuses_groups_of_two_in_the_config() -> None:
    """A config asking for secure groups of 2 is refused, naming the field and the way out."""
    with pytest.raises(ConfigError, match=r"min_group_size must be >= 3 in secure mode.*mode = 'plain'"):
        load_node_config(None, {"run.aggregation.min_group_size": 2})
    assert AggregationConfig(mode="plain", min_group_size=2).min_group_size == 2


def test_secure_is_the_default_mode() -> None:
    """A node config without an aggregation section aggregates securely."""
    assert load_node_config(None, {}).run.aggregation.mode == "secure"


def test_secure_aggregators_average_through_matchmaking(swarm_factory: Callable[..., list[SwarmPeer]]) -> None:
    """Three SecureAggregators meet through matchmaking and get the same weighted mean; parts follow bandwidth."""
    config = AggregationConfig(mode="secure", min_group_size=3, matchmaking_time=1.0, timeout=60.0)
    peers = swarm_factory(3)
    generator = torch.Generator().manual_seed(3)
    updates = [[torch.randn(400, 50, generator=generator) / 8, torch.randn(9, generator=generator) / 8] for _ in peers]
    originals = [[t.clone() for t in update] for update in updates]
    weights = [16.0, 32.0, 48.0]
    bandwidths = [1e6, 1e6, 4e6]  # hivemind's load balancing gives the whole vector to the fast peer
    aggregators = [
        SecureAggregator(peer.dht, "t", updates[0], config, peer.identity, weight_bound=64.0, bandwidth=bandwidth)
        for peer, bandwidth in zip(peers, bandwidths, strict=True)
    ]
    results: list[AggregationResult | None] = [None] * 3
    try:

        def step(i: int) -> None:
            results[i] = aggregators[i].aggregate(4, updates[i], weights[i])

        threads = [threading.Thread(target=step, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        sent = [a.bytes_sent for a in aggregators]
    finally:
        for aggregator in aggregators:
            aggregator.shutdown()

    assert all(r is not None and r.group_size == 3 and r.round == 4 for r in results)
    for k in range(2):
        expected = sum(w * u[k].double().clamp(-1, 1) for w, u in zip(weights, originals, strict=True)) / sum(weights)
        for update in updates:
            assert torch.allclose(update[k].double(), expected, atol=1e-6)
        assert all(torch.equal(update[k], updates[0][k]) for update in updates)  # bit-identical on every node
    vector_bytes = 4 * (400 * 50 + 9 + 1)
    assert all(s >= vector_bytes for s in sent[:2])  # the slow peers sent their whole masked vector to the reducer
    assert sent[2] >= 2 * vector_bytes  # the fast peer reduced it all and sent the sums to both
    assert sent[2] > 1.8 * max(sent[:2])  # an equal split would have them all send about the same


def run_demo(tmp_path: Path, mode: str) -> dict[str, object]:
    summary = tmp_path / f"{mode}.json"
    command = [*ZEN_NODE, "demo", "--peers", "3", "--rounds", "3", "--inner-steps", "20"]
    command += ["--aggregation", mode, "--workdir", str(tmp_path / mode), "--summary-json", str(summary)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data: dict[str, object] = json.loads(summary.read_text())
    return data


@pytest.mark.slow
def test_secure_training_reaches_the_loss_of_plain_averaging(tmp_path: Path) -> None:
    """The demo trained through the masked all-reduce ends within 1% of plain averaging's loss, peers in sync."""
    plain = run_demo(tmp_path, "plain")
    secure = run_demo(tmp_path, "secure")

    assert isinstance(secure["final_loss"], float) and isinstance(plain["final_loss"], float)
    assert abs(secure["final_loss"] - plain["final_loss"]) <= 0.01 * plain["final_loss"]
    assert secure["final_loss"] < 0.9 * float(secure["initial_loss"])  # type: ignore[arg-type]
    assert secure["max_param_divergence"] == 0.0  # integer sums: every peer applies the same bits
    per_peer = secure["per_peer"]
    assert isinstance(per_peer, list) and all(p["rounds_in_group"] == 3 for p in per_peer)


def test_demo_refuses_secure_with_two_peers(tmp_path: Path) -> None:
    """`zen-node demo --peers 2` in secure mode says why and how to run it instead."""
    command = [*ZEN_NODE, "demo", "--peers", "2", "--workdir", str(tmp_path / "d")]

    result = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "secure aggregation needs --peers >= 3" in result.stderr and "--aggregation plain" in result.stderr
