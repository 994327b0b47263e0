"""Verified downloads (node/training/state_sharing.py): a late joiner loads only a state the run's records sign."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from helpers import NodeProcess, write_run_config

from dht import NodeIdentity, PeerRecord, encode_sketch
from dht.records import SKETCH_DIM, Capacity
from dht.swarm import publish_record
from node.config import AggregationConfig, load_node_config
from node.data import generate_corpus
from node.model import build_model
from node.runtime import signed_record
from node.training.checkpoint import load_round_params
from node.training.outer import OuterState, state_digest
from node.training.state_sharing import RecordVerifier, SharedState, StateSharer, ahead_wait

if TYPE_CHECKING:
    from conftest import SwarmPeer

RUN_HASH = "ab" * 16
PARAMS = [torch.arange(6.0).reshape(2, 3), torch.ones(4)]
DIGEST = state_digest(PARAMS)


def _state(round_no: int, shift: float = 0.0) -> SharedState:
    return SharedState(round=round_no, run_hash=RUN_HASH, tensors=[p + shift for p in PARAMS] + PARAMS)


@pytest.fixture
def trainers(
    identity_factory: Callable[[str | None], NodeIdentity], record_factory: Callable[..., PeerRecord]
) -> Callable[..., list[PeerRecord]]:
    """``make((round, digest), ...)``: one trainer record of the run per pair."""

    def make(*states: tuple[int, bytes]) -> list[PeerRecord]:
        return [record_factory(identity_factory(None), round=r, state_digest=d) for r, d in states]

    return make


def test_a_node_that_missed_a_round_waits_for_a_peer_ahead_as_long_as_a_round_takes() -> None:
    """Not the whole aggregation timeout: when every member failed the round, nobody will be ahead."""
    config = AggregationConfig(matchmaking_time=2.0, message_timeout=10.0, timeout=120.0)
    assert ahead_wait(config, 0.0) == 12.0  # before any merged round: matchmaking and a message timeout
    assert ahead_wait(config, 5.0) == 22.0  # and twice the slowest merged round
    assert ahead_wait(config, 500.0) == 120.0  # never past the aggregation timeout


def test_a_state_the_majority_signs_passes(trainers: Callable[..., list[PeerRecord]]) -> None:
    """Two of three records sign the state's round and digest; a third (a Sybil) signs another."""
    records = trainers((5, DIGEST), (5, DIGEST), (5, b"x" * 16))
    RecordVerifier(lambda: records, RUN_HASH, "me", params=2)(_state(5))


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (_state(5, shift=0.5), "digest differs from the one 2 of the run's 3"),  # tampered parameters
        (_state(2**39), "round 549755813888 is beyond what the run's trainer records show"),  # a huge round
        (_state(4), "only 1 of the run's 3 trainer records show its round"),  # the Sybil's round alone
    ],
)
def test_a_state_the_majority_does_not_sign_is_refused(
    trainers: Callable[..., list[PeerRecord]], state: SharedState, reason: str
) -> None:
    """Tampered parameters, a round beyond the records and a minority's round are refused, with the reason."""
    records = trainers((5, DIGEST), (5, DIGEST), (4, state_digest(state.tensors[:2])))
    with pytest.raises(ValueError, match=reason):
        RecordVerifier(lambda: records, RUN_HASH, "me", params=2)(state)


def test_records_of_other_runs_roles_or_our_own_do_not_count(
    trainers: Callable[..., list[PeerRecord]],
    identity_factory: Callable[[str | None], NodeIdentity],
    record_factory: Callable[..., PeerRecord],
) -> None:
    """Only the run's trainers other than this node vote; with cohorts (params None) only the round is checked."""
    me = identity_factory("me")
    records = [
        *trainers((5, DIGEST)),
        record_factory(identity_factory(None), round=5, state_digest=b"y" * 16, run_hash="cd" * 16),
        record_factory(identity_factory(None), round=5, state_digest=b"y" * 16, roles=("server",)),
        record_factory(me, round=5, state_digest=b"y" * 16),
    ]
    RecordVerifier(lambda: records, RUN_HASH, me.peer_id, params=2)(_state(5))
    RecordVerifier(lambda: records, RUN_HASH, me.peer_id, params=None)(_state(5, shift=1.0))
    with pytest.raises(ValueError, match="no trainer record"):
        RecordVerifier(lambda: records[1:], RUN_HASH, me.peer_id, params=2)(_state(5))


@pytest.mark.slow
def test_a_joiner_skips_a_poisoned_donor_and_loads_the_signed_state(
    tmp_path: Path, swarm_factory: Callable[..., list[SwarmPeer]]
) -> None:
    """Two honest donors and a poisoned one (tampered parameters, top priority, its own digest in its record):
    a real `zen-node join` refuses the poisoned state, names the donor, and loads the honest one."""
    # Prepare
    config_path = write_run_config(tmp_path / "run.toml", run_id="verified")
    run = load_node_config(str(config_path)).run
    outer = OuterState(build_model(run.model, run.train.seed), run.train)
    with torch.no_grad():  # the swarm's trained state: anything but the joiner's initial one
        for i, param in enumerate(outer.params):
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(i)) * 0.01)
    honest = [t.detach().clone() for t in outer.shared_tensors()]
    count = len(outer.params)
    poisoned = [t + 0.5 if i < count else t for i, t in enumerate(honest)]
    round_no = 3
    peers = swarm_factory(3, run_ids=[run.run_id])
    served = [honest, honest, poisoned]
    sharers: list[StateSharer] = []
    joiner = None
    try:
        for peer, tensors in zip(peers, served, strict=True):
            record = signed_record(
                peer.identity,
                run,
                60.0,
                capacity=Capacity(),
                sketch=encode_sketch([0.0] * SKETCH_DIM),
                roles=("trainer",),
                round=round_no,
                state_digest=state_digest(tensors[:count]),
                maddrs=tuple(peer.maddrs),
            )
            assert publish_record(peer.dht, run.run_id, record)
            metadata = {"round": round_no, "run_hash": run.digest()}
            sharers.append(StateSharer(peer.dht, run.run_id, lambda m=metadata, t=tensors: (m, t)))
            sharers[-1].announce(round_no if tensors is honest else 2**39)  # the poisoned donor is asked first

        # Execute
        data = generate_corpus(20_000, seed=9)
        joiner = NodeProcess(tmp_path, "joiner", config_path, peers[0].maddrs[0], data, "--rounds", "1")
        code = joiner.wait(timeout=120)
    finally:
        if joiner is not None:
            joiner.stop()
        for sharer in sharers:
            sharer.shutdown()

    # Assert
    assert code == 0, joiner.tail()
    reports = joiner.reports()
    assert [(r["round"], r["mode"]) for r in reports] == [(round_no, "loaded")], reports
    loaded = load_round_params(joiner.params(round_no))
    assert all(torch.equal(a, b) for a, b in zip(loaded, honest[:count], strict=True))
    assert f"refused the state of donor {peers[2].identity.peer_id}" in joiner.output()
    assert "Traceback" not in joiner.output()
