"""A stage server that joins a stage refuses a lying donor's state (issue 15; node/sharding/joining.py).

Real in-process servers on 127.0.0.1 (tests/sharding_harness.py): two honest replicas and a
``LyingDonor`` of stage 0, all one step on; a joining server asks the liar first. The liar serves a
version 2^40 ahead, params shifted by 5, runaway Adam moments, a NaN, or params nudged by 0.01
(within what one update moves them) at the honest version, either under the honest history (its
digest is then a minority of three) or under another (it dodges the comparison and is outside the
class two replicas agree on). The joiner refuses it, logs it by PeerID with the reason, and loads
the honest replicas' state. A liar that is the stage's only server is refused too, and the joiner
serves the run's seeded weights at version 0. Before the join checks the joiner loaded whatever the
first donor sent (only a state of wrong shapes or non-finite values failed to load).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import wait_until
from sharding_harness import LyingDonor, node_config, runaway_moments, shifted_params, start_servers

from dht import NodeIdentity, PeerRecord
from node.config import ServeConfig
from node.sharding.hosted import HostedStage
from node.sharding.messages import PROOF_BYTES, StageReply, StageRequest
from node.sharding.proofs import gradients_digest, sign_step
from node.sharding.server import StageServer
from node.sharding.stages import build_stage


class AsksTheLiarFirst(StageServer):
    """A joining server that waits until it lists ``listed`` servers of the stage, then asks ``liar`` first."""

    liar = ""
    listed = 0

    def _host(self, stage: int, records: list[PeerRecord]) -> None:
        def servers_of_stage() -> list[PeerRecord]:
            found = [r for r in self._swarm().peers() if stage in r.stages and r.peer_id != self.identity.peer_id]
            return found if len(found) >= self.listed else []

        listed = wait_until(servers_of_stage, 30, "the joiner to list the stage's servers")
        super()._host(stage, sorted(listed, key=lambda r: r.peer_id != self.liar))


def start_joiner(tmp_path: Path, first: StageServer, liar: StageServer, listed: int) -> AsksTheLiarFirst:
    """A server of stage 0 joining ``first``'s swarm (the run of ``start_servers``) that asks ``liar`` first."""
    joiner = AsksTheLiarFirst(
        node_config(tmp_path, "joiner", list(first.maddrs), spot_check=0.0),
        ServeConfig(rebalance_period=0, stages=(0,)),
    )
    joiner.liar, joiner.listed = liar.identity.peer_id, listed
    try:
        joiner.start()
    except BaseException:
        joiner.shutdown()
        raise
    return joiner


def params_of(server: StageServer) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in server.hosted[0].params]


def state_of(server: StageServer) -> list[torch.Tensor]:
    """Stage 0's params, Adam moments and anchor on ``server``."""
    return [t.detach().cpu().clone() for t in server.hosted[0].state()]


def nan_params(hosted: HostedStage) -> list[torch.Tensor]:
    """The stage's state with one NaN among its params."""
    state = [t.clone() for t in hosted.state()]
    state[0].view(-1)[0] = float("nan")
    return state


def nudged_params(hosted: HostedStage) -> list[torch.Tensor]:
    """The stage's state with every parameter moved by 0.01: less than one update (lr * 8) moves it."""
    count = len(hosted.params)
    return [t + 0.01 if i < count else t for i, t in enumerate(hosted.state())]


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not loading the state of replica" in r.getMessage()]


@pytest.mark.parametrize(
    ("version", "poison", "history", "reason"),
    [
        (2**40, shifted_params, None, f"its version {2**40} is not in [0, 25"),
        (2, shifted_params, None, "its params are 5 from the run's seeded weights, more than 2 updates"),
        (1, runaway_moments, None, "Adam moments are none AdamW makes"),
        (1, nan_params, None, "not finite params"),
        (1, nudged_params, None, "its weights digest at version 1 is a minority: 2 of 3 agree"),
        (1, nudged_params, bytes(32), "are not those of the 2 replicas that agree on version 1"),
    ],
    ids=["inflated-version", "shifted-params", "runaway-moments", "non-finite", "minority-weights", "dodging-history"],
)
def test_a_joining_server_refuses_a_lying_donor_and_loads_the_honest_replicas_state(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    version: int,
    poison: Callable[[HostedStage], list[torch.Tensor]],
    history: bytes | None,
    reason: str,
) -> None:
    """The joiner asks the liar first: it refuses its state, logs its PeerID and why, and loads the
    honest replicas' state (version 1, their params, moments and anchor), confirmed by their weights reports."""
    # Prepare
    servers = start_servers(tmp_path, [StageServer, StageServer, LyingDonor])
    honest, liar = servers[:2], servers[2]
    joiner: StageServer | None = None
    try:
        for server in servers:
            grads = [torch.full_like(p, 0.1) for p in server.hosted[0].params]
            server.rpc.run(server.in_compute(server.hosted[0].apply, ("trainer", 7), grads), timeout=30)
        expected = state_of(honest[0])
        liar.lie, liar.history = (version, poison), history  # type: ignore[attr-defined]

        # Execute
        with caplog.at_level(logging.INFO, logger="node.sharding.joining"):
            joiner = start_joiner(tmp_path, servers[0], liar, listed=3)

        # Assert
        assert joiner.hosted[0].version == 1
        assert all(torch.equal(a, b) for a, b in zip(state_of(joiner), expected, strict=True))
        logged = refusals(caplog)
        assert len(logged) == 1 and liar.identity.peer_id in logged[0] and reason in logged[0]
        join = joiner.joins[0]
        assert join.donor in {s.identity.peer_id for s in honest} and join.confirmed and join.version == 1
        assert list(join.refused) == [liar.identity.peer_id] and reason in join.refused[liar.identity.peer_id]
    finally:
        for server in [*servers, *([joiner] if joiner else [])]:
            server.shutdown()


def test_a_server_joining_a_stage_whose_only_replica_lies_serves_the_seeded_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stage's only server offers params shifted by 5 at a version 2^40 beyond what its record
    announces: the joiner refuses it and serves the run's seeded weights at version 0, and says so."""
    # Prepare
    (liar,) = start_servers(tmp_path, [LyingDonor])
    liar.lie = (2**40, shifted_params)  # type: ignore[attr-defined]
    run = liar.run
    seeded = [p.detach() for p in build_stage(run.model, run.sharding, run.train.seed, 0).parameters()]
    joiner: StageServer | None = None
    try:
        # Execute
        with caplog.at_level(logging.INFO, logger="node.sharding.joining"):
            joiner = start_joiner(tmp_path, liar, liar, listed=1)

        # Assert
        assert joiner.hosted[0].version == 0
        assert all(torch.equal(a, b) for a, b in zip(params_of(joiner), seeded, strict=True))
        assert len(refusals(caplog)) == 1 and liar.identity.peer_id in refusals(caplog)[0]
        assert any("serving it from the run's seeded weights at version 0" in r.getMessage() for r in caplog.records)
        join = joiner.joins[0]
        assert join.donor is None and list(join.refused) == [liar.identity.peer_id]
        assert "is not in [0, 25" in join.refused[liar.identity.peer_id]
    finally:
        for server in [liar, *([joiner] if joiner else [])]:
            server.shutdown()


class ForgingDonor(StageServer):
    """Serves its honest state, with ``victim``'s next steps 8..19 listed as applied (no proof of them)."""

    victim = ""

    async def _state(self, request: StageRequest, hosted: HostedStage) -> StageReply:
        reply = await super()._state(request, hosted)
        forged = tuple((self.victim, step, bytes(32), bytes(PROOF_BYTES)) for step in range(8, 20))
        return dataclasses.replace(reply, applied=reply.applied + forged)


def test_a_joining_server_marks_done_only_the_steps_their_trainers_signed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A donor's state is honest but lists a trainer's next 12 steps as applied: the joiner loads the state,
    keeps the step the trainer signed (so a retried commit of it is still recognized) and marks none of the
    forged ones done (before, it copied them all, and answered the trainer's real steps ``ok`` unapplied)."""
    # Prepare
    servers = start_servers(tmp_path, [StageServer, StageServer, ForgingDonor])
    forger = servers[2]
    trainer = NodeIdentity.load_or_create(tmp_path / "trainer")
    joiner: StageServer | None = None
    try:
        grads = [torch.full_like(p, 0.1) for p in servers[0].hosted[0].params]
        digest = gradients_digest(grads)
        evidence = (digest, sign_step(trainer, servers[0].run.digest(), 0, 7, digest))
        for server in servers:
            apply = server.hosted[0].apply
            server.rpc.run(server.in_compute(apply, (trainer.peer_id, 7), grads, evidence), timeout=30)
        forger.victim = trainer.peer_id  # type: ignore[attr-defined]

        # Execute
        with caplog.at_level(logging.INFO, logger="node.sharding.joining"):
            joiner = start_joiner(tmp_path, servers[0], forger, listed=3)

        # Assert
        applied = joiner.hosted[0].applied
        assert joiner.joins[0].donor == forger.identity.peer_id and joiner.hosted[0].version == 1
        assert (trainer.peer_id, 7) in applied
        assert [step for peer, step in applied if peer == trainer.peer_id] == [7]
        assert any(f"12 of {forger.identity.peer_id}'s applied steps" in r.getMessage() for r in caplog.records)
    finally:
        for server in [*servers, *([joiner] if joiner else [])]:
            server.shutdown()
