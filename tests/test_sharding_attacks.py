"""Deviating stage servers and Sybil trainers against honest peers on 127.0.0.1 (issue 15, items 3 and 4).

Replication pre-emption: a server listed for the stage sends ``replicate(trainer=victim, step=s)``
with gradients of its choice, to claim the victim's future steps. Sybil bans: a trainer record that
just appeared bans every honest server. Both run against real in-process servers, trainers and DHT
peers (real libp2p, real signatures); each test fails on the code before the defence.

Mending from a lying replica: a listed server answers ``state`` with a poisoned state at a
version ahead of everyone's; an honest replica that mends after a round without a group refuses
it, names it in its log and copies the honest replica ahead instead (node/sharding/averaging.py).

Share inflation: a server relays the steps it commits to the other replicas at a full share of the
stage's learning rate, where the trainer signed 1 / the run's trainers; the replicas refuse them.

Weights that agree: a server whose stage weights were tampered, and which computes consistently
with them (so spot-checks pass), among two honest replicas: the trainer compares the replicas'
weights digests and bans the minority (node/sharding/agreement.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import torch
from conftest import SwarmPeer
from helpers import wait_until
from hivemind.utils import get_dht_time
from sharding_harness import (
    LyingDonor,
    ProofKeeper,
    ShareInflater,
    TamperedServer,
    node_config,
    runaway_moments,
    shifted_params,
    signed_ban,
    start_servers,
    victim_trainer,
)

from dht import NodeIdentity, PeerRecord, publish_record
from dht.bans import MAX_BAN_TTL, BanError, BanRecord, ban_subkey, bans_key, list_bans, publish_ban
from node.data import generate_corpus
from node.sharding.agreement import INITIAL_HISTORY, WeightsReport, compare_weights
from node.sharding.client import RemoteStages
from node.sharding.hosted import HostedStage
from node.sharding.messages import StageMessageError, StageReply, StageRequest
from node.sharding.proofs import sign_step, step_digest
from node.sharding.server import StageServer
from node.sharding.stages import build_stage
from node.sharding.trainer import ShardedTrainer


def params_of(server: StageServer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in server.hosted[0].params]


def test_a_listed_server_cannot_preempt_a_trainers_steps_by_replicating_them(tmp_path: Path) -> None:
    """A listed server replicates the victim's next steps (no proof, its own key, a replayed proof): all refused.

    The honest replicas mark nothing done, the victim's real steps then apply on every replica, and the
    replicas stay bit-identical. Before step proofs, the forged steps were applied and the real ones dropped.
    """
    # Prepare
    servers = start_servers(tmp_path, [StageServer, StageServer, ProofKeeper])
    honest, attacker = servers[:2], servers[2]
    victim = victim_trainer(tmp_path, servers, seed=41)
    try:
        victim.prepare()
        victim.join()
        victim.train_step()  # the attacker, a listed replica, now holds a real proof and the victim's session
        wait_until(lambda: attacker.proofs, 30, "the attacker to receive a step proof")  # type: ignore[attr-defined]
        trainer = victim.identity.peer_id
        future = [(victim.session << 24) | s for s in range(1, 4)]
        forged = tuple(torch.full_like(p, 5.0).cpu() for p in attacker.hosted[0].params)
        run_hash = attacker.run.digest()
        own_proof = sign_step(attacker.identity, run_hash, 0, future[1], step_digest(forged, 1.0))
        replayed = attacker.proofs[0]  # type: ignore[attr-defined]
        attacks = [(future[0], b""), (future[1], own_proof), (future[2], replayed)]
        before = [s.refused for s in honest]

        # Execute
        replies: list[StageReply] = []
        for step, proof in attacks:
            for server in honest:
                request = StageRequest("replicate", 0, trainer, step, 0, 1, forged, proof, version=2)
                replies.append(attacker.rpc.run(attacker.call(server.identity.peer_id, request), timeout=30))
        claimed = [[key for key in s.hosted[0].applied if key[0] == trainer] for s in honest]
        versions_after_attack = [s.hosted[0].version for s in honest]
        reports = [victim.train_step() for _ in future]

        # Assert
        assert [r.ok for r in replies] == [False] * 6
        assert "no step proof" in replies[0].reason
        assert "not bound to trainer" in replies[2].reason
        assert "does not verify" in replies[4].reason
        assert [s.refused - b for s, b in zip(honest, before, strict=True)] == [3, 3]
        assert claimed == [[(trainer, victim.session << 24)]] * 2
        assert versions_after_attack == [1, 1]
        assert [r.versions for r in reports] == [[2], [3], [4]]
        for server in servers:
            assert all((trainer, step) in server.hosted[0].applied for step in future)
            assert all(torch.equal(a, b) for a, b in zip(params_of(server), params_of(honest[0]), strict=True))
            assert all(torch.isfinite(p).all() and p.abs().max() < 4.0 for p in params_of(server))
    finally:
        victim.close()
        for server in servers:
            server.shutdown()


def test_a_replica_cannot_inflate_a_trainers_share_of_the_stages_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The victim commits at a quarter share to a server that replicates at a full share: the honest replicas refuse
    (the proof signs the share), log why, and apply nothing. (Honest relays of signed shares: every other test.)"""
    # Prepare
    servers = start_servers(tmp_path, [StageServer, StageServer, ShareInflater])
    honest, inflater = servers[:2], servers[2]
    victim = victim_trainer(tmp_path, servers, seed=43)
    try:
        victim.prepare()
        victim.join()
        victim.share = 0.25  # as if four trainers were listed
        assert victim.remote is not None
        victim.remote.unconfirmed = {s.identity.peer_id for s in honest}  # the victim tries the inflater first
        before = [s.refused for s in honest]

        # Execute
        inflated = [victim.train_step() for _ in range(2)]
        refused = [s.refused - b for s, b in zip(honest, before, strict=True)]
        applied = [[key for key in s.hosted[0].applied if key[0] == victim.identity.peer_id] for s in honest]

        # Assert
        assert [r.versions for r in inflated] == [[1], [2]]
        assert inflater.hosted[0].version == 2
        assert refused == [1, 1]  # the first relay; the inflater then cools the replicas that refused it down
        assert applied == [[], []]
        assert [s.hosted[0].version for s in honest] == [0, 0]
        assert "did not sign these gradients" in caplog.text
    finally:
        victim.close()
        for server in servers:
            server.shutdown()


def test_a_stage_step_moves_the_params_by_the_trainers_share_and_bad_shares_are_refused(tmp_path: Path) -> None:
    """AdamW's step scales with its lr: a step at share 0.25 moves each param a quarter as far as at share 1;
    a share outside [1/1024, 1] or not a float is refused in a line."""
    # Prepare
    run = node_config(tmp_path, "unit", [], spot_check=0.0).run
    stages = [HostedStage(build_stage(run.model, run.sharding, 0, 0), 0.01, 0.1) for _ in range(2)]
    start = [p.detach().clone() for p in stages[0].params]
    grads = [torch.randn_like(p) for p in start]
    request = StageRequest("commit", 0, "t", 1, share=0.5)
    wire = msgpack.unpackb(request.encode(), raw=False)

    # Execute
    stages[0].apply(("t", 1), grads, share=1.0)
    stages[1].apply(("t", 1), grads, share=0.25)
    moved = [[(p - s).abs().sum().item() for p, s in zip(h.params, start, strict=True)] for h in stages]

    # Assert
    assert all(abs(quarter / full - 0.25) < 1e-4 for full, quarter in zip(*moved, strict=True))
    assert StageRequest.decode(request.encode()).share == 0.5
    for share in (0.0, 2.0, float("nan"), 1e-4):
        with pytest.raises(StageMessageError, match="share must be in"):
            StageRequest("commit", 0, "t", 1, share=share)
    with pytest.raises(StageMessageError, match="share has type int"):
        StageRequest.decode(msgpack.packb({**wire, "share": 1}, use_bin_type=True))


@pytest.mark.parametrize(
    ("version", "poison", "reason"),
    [
        (2**40, shifted_params, "ahead of ours, more than the 256"),
        (2, shifted_params, "its params are 5 from ours"),
        (2, runaway_moments, "Adam moments are none AdamW makes"),
    ],
    ids=["inflated-version", "shifted-params", "runaway-moments"],
)
def test_a_replica_mending_after_a_round_without_a_group_refuses_a_lying_donor(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    version: int,
    poison: Callable[[HostedStage], list[torch.Tensor]],
    reason: str,
) -> None:
    """The liar ranks first (highest version) with a poisoned state: the honest replica refuses it, logs it,
    and copies the honest replica one step ahead. Before the Mending checks it copied the liar's state."""
    # Prepare
    servers = start_servers(tmp_path, [StageServer, StageServer, LyingDonor])
    behind, ahead, liar = servers
    try:
        grads = [torch.full_like(p, 0.1) for p in ahead.hosted[0].params]
        ahead.rpc.run(ahead.in_compute(lambda: ahead.hosted[0].apply(("trainer", 7), grads)), timeout=30)
        expected = params_of(ahead)
        liar.lie = (version, poison)  # type: ignore[attr-defined]

        # Execute
        with caplog.at_level(logging.WARNING, logger="node.sharding.averaging"):
            outcome = behind.rpc.run(behind.averager.average(0), timeout=90)

        # Assert
        assert outcome == "resynced"
        assert behind.hosted[0].version == 1
        assert all(torch.equal(a, b) for a, b in zip(params_of(behind), expected, strict=True))
        assert behind.averager.donors_refused == {liar.identity.peer_id: 1}
        refusals = [r.getMessage() for r in caplog.records if "not copying the state" in r.getMessage()]
        assert len(refusals) == 1 and liar.identity.peer_id in refusals[0] and reason in refusals[0]
    finally:
        for server in servers:
            server.shutdown()


def test_a_sybil_trainer_cannot_ban_an_honest_server_and_a_quorum_of_trainers_bans_a_cheater(
    tmp_path: Path,
    swarm_factory: Callable[..., list[SwarmPeer]],
    identity_factory: Callable[[str | None], NodeIdentity],
    record_factory: Callable[..., PeerRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh Sybil trainer bans every server: none is excluded or even deprioritized; neither does a trainer
    of another run nor a ban naming a stage the server does not host. One seasoned trainer's ban only
    deprioritizes the cheater, two exclude it, and it is usable again once their bans expire."""
    # Prepare
    monkeypatch.setattr("node.sharding.client.REFRESH_SECONDS", 0.0)  # every servers() call reads the DHT
    reader, publisher = swarm_factory(2, run_ids=["shard"])
    run = node_config(tmp_path, "reader", []).run
    run_hash = run.digest()
    ids = {name: identity_factory(name) for name in ("honest", "cheater", "sybil", "stranger", "t1", "t2")}
    fields: dict[str, dict[str, object]] = {
        "honest": {"roles": ("server",), "stages": (0,)},
        "cheater": {"roles": ("server",), "stages": (0,)},
        "sybil": {"roles": ("trainer",), "round": 0},  # just made: it has taken part in nothing
        "stranger": {"roles": ("trainer",), "round": 50, "run_hash": "cd" * 16},  # a trainer of another run
        "t1": {"roles": ("trainer",), "round": 20},
        "t2": {"roles": ("trainer",), "round": 20},
    }
    for name, overrides in fields.items():
        record = record_factory(ids[name], **({"run_hash": run_hash} | overrides))
        assert publish_record(publisher.dht, "shard", record.sign(ids[name]))
    honest, cheater = ids["honest"].peer_id, ids["cheater"].peer_id
    remote = RemoteStages(reader.dht, run, reader.identity, tmp_path / "reader")

    def view() -> tuple[list[str], set[str], set[str]]:
        """The reader's usable servers of stage 0 (best first), and those it excludes and deprioritizes."""
        return remote.servers(0), set(remote.banned), set(remote.suspected)

    try:
        wait_until(lambda: len(remote.servers(0)) == 2, 30, "the reader to list both servers")

        # Execute
        for envelope in (
            signed_ban(ids["sybil"], honest, run_hash),
            signed_ban(ids["sybil"], cheater, run_hash),
            signed_ban(ids["stranger"], honest, run_hash),
            signed_ban(ids["t1"], honest, run_hash, stage=1),  # honest serves stage 0
        ):
            assert publish_ban(publisher.dht, "shard", envelope)
        wait_until(lambda: len(list_bans(reader.dht, "shard")) == 4, 30, "the reader to see the Sybil bans")
        after_sybils = view()
        assert publish_ban(publisher.dht, "shard", signed_ban(ids["t1"], cheater, run_hash, ttl=8.0))
        one_reporter = view() if wait_until(lambda: view()[2], 30, "the cheater deprioritized") else None
        assert publish_ban(publisher.dht, "shard", signed_ban(ids["t2"], cheater, run_hash, ttl=8.0))
        quorum = view() if wait_until(lambda: view()[1], 30, "the cheater excluded") else None
        expired = view() if wait_until(lambda: not any(view()[1:]), 30, "the bans to expire") else None
        bans_left = len(list_bans(reader.dht, "shard"))
        too_long = signed_ban(ids["t1"], honest, run_hash, ttl=MAX_BAN_TTL)
        stored_past_ttl = publisher.dht.store(
            bans_key("shard"),
            too_long,
            expiration_time=get_dht_time() + 2 * MAX_BAN_TTL,
            subkey=ban_subkey(BanRecord.verify(too_long)),
        )

        # Assert
        assert after_sybils == (sorted([honest, cheater]), set(), set())
        assert one_reporter == ([honest, cheater], set(), {cheater})  # deprioritized: tried last
        assert quorum == ([honest], {cheater}, set())
        assert expired == (sorted([honest, cheater]), set(), set())
        assert bans_left == 4  # the cheater's two bans expired; the four uncounted ones remain
        assert not stored_past_ttl
        with pytest.raises(BanError, match="ttl"):
            signed_ban(ids["t1"], honest, run_hash, ttl=MAX_BAN_TTL + 1)
    finally:
        remote.shutdown()


def test_a_server_with_tampered_weights_that_computes_consistently_is_caught_by_its_replicas_digests(
    tmp_path: Path,
) -> None:
    """A tampered replica passes spot-checks but its weights digest is a minority of three: the trainer
    bans it with evidence and steps on the honest replicas, which stay usable, unsuspected and bit-identical."""
    # Prepare
    servers = start_servers(tmp_path, [StageServer, StageServer, TamperedServer], spot_check=1.0)
    honest, cheater = servers[:2], servers[2].identity.peer_id
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=43))
    config = node_config(tmp_path, "trainer", list(servers[0].maddrs), spot_check=1.0)
    config.data = str(tmp_path / "data.txt")
    trainer = ShardedTrainer(config)
    try:
        trainer.prepare()
        trainer.join()

        # Execute
        reports = [trainer.train_step() for _ in range(3)]
        remote = trainer.remote
        assert remote is not None
        published = wait_until(lambda: list_bans(honest[0].dht, "shard"), 30, "the ban to reach the DHT")

        # Assert
        assert [b.banned for b in remote.bans_published] == [cheater]
        assert "weights digest at version 1 is a minority: 2 of 3" in remote.bans_published[0].reason
        assert [b.banned for b in published] == [cheater]
        assert cheater in remote.banned and cheater not in remote.servers(0)
        assert {s.identity.peer_id for s in honest} == set(remote.servers(0))
        assert not (remote.suspected | remote.unconfirmed) & {s.identity.peer_id for s in honest}
        assert remote.stats["spot_checks"] >= 3  # every forward was recomputed; none flagged the cheater
        assert all(not cheater.startswith(r.servers[0]) for r in reports[1:])
        assert [r.versions for r in reports] == [[1], [2], [3]]
        assert all(torch.equal(a, b) for a, b in zip(params_of(honest[0]), params_of(honest[1]), strict=True))
    finally:
        trainer.close()
        for server in servers:
            server.shutdown()


def test_weights_verdict_bans_only_a_minority_of_the_same_version_and_history() -> None:
    """Same version and history: the odd digest is the minority; another history or a tie bans nobody."""
    # Prepare
    history, other = INITIAL_HISTORY, bytes(32)
    good, bad = b"g" * 32, b"b" * 32

    # Execute
    minority = compare_weights(
        {
            "a": WeightsReport(4, history, good),
            "b": WeightsReport(4, history, good),
            "c": WeightsReport(4, history, bad),
        }
    )
    dodging = compare_weights(
        {"a": WeightsReport(4, history, good), "b": WeightsReport(4, history, good), "c": WeightsReport(4, other, bad)}
    )
    tie = compare_weights({"a": WeightsReport(4, history, good), "b": WeightsReport(4, history, bad)})
    split = compare_weights({"a": WeightsReport(4, history, good), "b": WeightsReport(4, other, good)})

    # Assert
    assert (minority.agreed, minority.minority, minority.unconfirmed) == (good, {"c"}, set())
    assert (dodging.agreed, dodging.minority, dodging.unconfirmed) == (good, set(), {"c"})
    assert (tie.agreed, tie.minority) == (b"", set())
    assert (split.version, split.minority, split.unconfirmed) == (None, set(), set())
    with pytest.raises(StageMessageError, match="history"):
        StageReply.decode(StageReply(ok=True).encode().replace(b"\xa7history\xc4\x00", b"\xa7history\xc4\x03abc"))
