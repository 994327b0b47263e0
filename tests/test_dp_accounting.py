"""DP that matches its accounting: every release counted, no retry without one, nothing served un-noised.

Real libp2p peers on 127.0.0.1 with real crypto: the masked all-reduce's sessions (secagg_harness),
and a real node process for the solo round.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hivemind
import numpy as np
import pytest
import torch
from helpers import NodeProcess, wait_until, write_run_config
from secagg_harness import SecAggSwarm

from node.config import load_node_config
from node.model import build_model
from node.secagg.privacy import NoiseShare, PrivacyAccountant, ReleaseLedger, ReleaseRefused
from node.secagg.protocol import MaskedAllReduce
from node.secagg.state import SecAggError, SecAggTimeouts
from node.training.state_sharing import StateSharer

NUMEL = 2000
FAST = SecAggTimeouts(message=3.0, data=6.0)


class WithholdsItsSum(MaskedAllReduce):
    """A holder that takes every other partial sum and never sends its own: it decodes, the others fail."""

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        if kind == "sum":
            return True  # pretend it left
        return await super()._send(to, kind, data, payload, timeout)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecAggSwarm]:
    peers = SecAggSwarm(Path(tmp_path_factory.mktemp("dp-accounting")), size=4)
    try:
        yield peers
    finally:
        peers.close()


def dp_round(
    swarm: SecAggSwarm, ledgers: list[ReleaseLedger], classes: dict[int, type[MaskedAllReduce]] | None = None
) -> tuple[list[Any], set[int], set[int]]:
    """One round of 4 DP sessions (each noise share with its peer's ledger): the outcomes, the peers whose
    masked parts another peer received (a release on the wire), and the peers another heard anything from."""
    share = NoiseShare(noise_multiplier=1.0, clip_norm=1.0, max_dropouts=1)
    vectors = [np.zeros(NUMEL, np.float32)] * 4
    sessions = swarm.sessions(vectors, bound=11.0, classes=classes, timeouts=FAST, record_view=True)
    for session, ledger in zip(sessions, ledgers, strict=True):
        session.noise = NoiseShare(share.noise_multiplier, share.clip_norm, share.max_dropouts, ledger=ledger)
    outcomes = swarm.run(sessions)
    on_wire = {m.sender for s in sessions for m in s.view or [] if m.kind == "part" and m.sender != s.index}
    heard = {m.sender for s in sessions for m in s.view or [] if m.sender != s.index}
    return outcomes, on_wire, heard


def test_every_release_is_counted_and_none_is_retried_without_a_permit(swarm: SecAggSwarm) -> None:
    """A round failed by a withheld sum still counts; its retry sends nothing; the count equals the wire's."""
    ledgers = [ReleaseLedger() for _ in range(4)]
    accountants = [PrivacyAccountant(1.0, 1e-5, math.inf, ledger=ledger) for ledger in ledgers]
    wire = [0] * 4

    # round 1: peer 3 withholds its partial sum after receiving the others' (it alone decodes)
    for accountant in accountants:
        assert accountant.permit_round()
    outcomes, on_wire, _ = dp_round(swarm, ledgers, {3: WithholdsItsSum})
    for j in on_wire:
        wire[j] += 1
    assert all(isinstance(outcomes[i], SecAggError) for i in range(3)), outcomes
    assert not isinstance(outcomes[3], BaseException)  # the withholder got the noisy sum: a release
    assert [a.sync() for a in accountants] == [1, 1, 1, 1]

    # the retry on the same tensors, with no new permit: peer 0 refuses before sending anything
    for accountant in accountants[1:]:
        assert accountant.permit_round()
    outcomes, on_wire, heard = dp_round(swarm, ledgers)
    for j in on_wire:
        wire[j] += 1
    assert isinstance(outcomes[0], ReleaseRefused)
    assert 0 not in heard  # not even its keys left
    assert all(not isinstance(outcomes[i], BaseException) for i in (1, 2, 3)), outcomes
    assert outcomes[1].contributors == (1, 2, 3)
    assert [a.sync() for a in accountants] == [0, 1, 1, 1]

    # a new round, a new permit: counted again
    for accountant in accountants:
        assert accountant.permit_round()
    outcomes, on_wire, _ = dp_round(swarm, ledgers)
    for j in on_wire:
        wire[j] += 1
    assert all(not isinstance(outcome, BaseException) for outcome in outcomes), outcomes
    assert [a.sync() for a in accountants] == [1, 1, 1, 1]

    assert [a.rounds for a in accountants] == wire == [2, 3, 3, 3]
    assert [ledger.released for ledger in ledgers] == wire


def test_a_spent_budget_grants_no_permit() -> None:
    """permit_round grants a release only while one more fits the budget, and the ledger then refuses."""
    ledger = ReleaseLedger()
    accountant = PrivacyAccountant(2.0, 1e-5, budget=accountant_budget(2.0, 1), ledger=ledger)

    assert accountant.permit_round()
    ledger.take()
    accountant.sync()

    assert not accountant.permit_round()
    with pytest.raises(ReleaseRefused):
        ledger.check()
    assert accountant.rounds == 1


def accountant_budget(sigma: float, rounds: int) -> float:
    """A budget between epsilon(rounds) and epsilon(rounds + 1)."""
    from node.secagg.privacy import pld_epsilon

    return (pld_epsilon(sigma, rounds, 1e-5) + pld_epsilon(sigma, rounds + 1, 1e-5)) / 2


@pytest.mark.slow
def test_a_solo_dp_round_serves_no_unnoised_update(tmp_path: Path, bootstrap_maddr: str) -> None:
    """A user-level DP node alone trains, but the state it serves to peers stays the initial (noised-only) one."""
    config = write_run_config(
        tmp_path / "run.toml",
        train={"inner_steps": 4, "batch_size": 8},
        aggregation={"timeout": 4.0, "matchmaking_time": 1.0},
        privacy={"enabled": True, "level": "user", "noise_multiplier": 1.0, "clip_norm": 1.0, "allow_noisy": True},
    )
    run = load_node_config(config).run
    initial = [p.detach() for p in build_model(run.model, run.train.seed).parameters()]
    node = NodeProcess(tmp_path, "alone", config, bootstrap_maddr, bytes(range(256)) * 80, "--rounds", "50")
    dht = hivemind.DHT(initial_peers=[bootstrap_maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    sharer = None
    try:
        node.wait_for(re.compile(r"applying our own update alone"), 120)
        wait_until(lambda: sum(r["mode"] == "solo" for r in node.reports()) >= 2, 120, "two solo rounds")
        sharer = StateSharer(dht, run.run_id, lambda: ({}, initial + initial))
        state = sharer.download_retrying([torch.zeros_like(p) for p in initial * 2], run.digest(), threading.Event())
        reports = node.reports()
    finally:
        if sharer is not None:
            sharer.shutdown()
        dht.shutdown()
        node.stop()

    assert state is not None and state.round >= 2
    solo = [r for r in reports if r["mode"] == "solo"]
    assert all(r["inner_steps"] == 4 and math.isfinite(r["train_loss"]) for r in solo)  # it did train
    for served, start in zip(state.tensors[: len(initial)], initial, strict=True):
        assert torch.equal(served, start)
    assert len({r["state_digest"] for r in reports}) == 1
