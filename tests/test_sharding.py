"""Sharded training on 127.0.0.1: real `zen-node serve` and `zen-node join` processes, real libp2p.

The run's 4-block GPT keeps block 0 on the trainer and cuts blocks 1-3 into 2 remote stages.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from helpers import LOCALHOST_MADDR, NodeProcess, wait_until, write_run_config
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from sharding_harness import node_config

from dht import NodeIdentity, SwarmConfig, start_dht
from dht.bans import BanError, BanRecord, evidence_digest, list_bans
from node.config import ModelConfig, RunConfig, ServeConfig, ShardingConfig, load_node_config
from node.data import generate_corpus
from node.model import build_model
from node.sharding.messages import StageReply, StageRequest
from node.sharding.proofs import gradients_digest, sign_step
from node.sharding.rpc import P2PLoop, call_stage, stage_handler_name
from node.sharding.server import StageServer
from node.sharding.stages import LocalParts, build_stage
from node.sharding.trainer import ShardedTrainer, StepReport, training_batches, unsharded_losses

# The run the process tests share (see the module docstring); each test sets its own train.inner_steps.
SHARDED_RUN: dict[str, Any] = dict(
    run_id="shard",
    model={"n_layer": 4},
    aggregation=None,  # no [run.aggregation]: the defaults
    sharding={
        "stages": 2,
        "local_blocks": 1,
        "micro_batches": 2,
        "request_timeout": 3.0,
        "spot_check_fraction": 0.1,
        "average_period": 0,  # these tests count one version per step; averaging is tested in-process below
    },
    node={"heartbeat_period": 1.0, "record_ttl": 6.0},
)
LOSS_TOLERANCE = 0.02  # the bound: the sharded loss curve within 2% of the unsharded one
SERVING = re.compile(r"serving stage\(s\) \[([0-9, ]+)\] of run \S+ as (\S+) .* multiaddrs (\S+)")


def serve(root: Path, name: str, config: Path, initial: str | None, *extra: str) -> tuple[NodeProcess, list[int], str]:
    """Start `zen-node serve`; return it, the stages it chose and its multiaddr (its PeerID is ``.peer_id``)."""
    server = NodeProcess(root, name, config, initial, None, *extra, command="serve")
    try:
        match = server.wait_for(SERVING, 90)
    except BaseException:
        server.stop()
        raise
    stages = [int(s) for s in match.group(1).split(",")]
    server.peer_id = match.group(2)
    return server, stages, match.group(3)


def relative_gap(sharded: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(sharded, reference, strict=True))


@pytest.mark.slow
def test_sharded_training_matches_unsharded_loss_curve(tmp_path: Path) -> None:
    """Two servers pick the two stages by block selection; the trainer's losses track the unsharded run within 2%."""
    # Prepare
    config = write_run_config(tmp_path / "run.toml", train={"inner_steps": 10}, **SHARDED_RUN)
    corpus = generate_corpus(30_000, seed=11)
    processes: list[NodeProcess] = []
    try:
        first, first_stages, maddr = serve(tmp_path, "s0", config, None)
        processes.append(first)
        second, second_stages, _ = serve(tmp_path, "s1", config, maddr)
        processes.append(second)

        # Execute
        trainer = NodeProcess(tmp_path, "trainer", config, maddr, corpus, "--rounds", "2")
        processes.append(trainer)
        code = trainer.wait(120)

        # Assert
        assert (first_stages, second_stages) == ([0], [1])
        assert code == 0, trainer.output()[-3000:]
        steps, rounds = trainer.steps(), trainer.reports()
        assert [r["step"] for r in steps] == list(range(1, 21))
        assert [(r["round"], r["mode"], r["inner_steps"], r["samples"]) for r in rounds] == [
            (1, "solo", 10, 80),
            (2, "solo", 10, 80),
        ]  # a line per round, zen-node join's fields
        assert rounds[1]["eval_loss"] == steps[-1]["eval_loss"] and 0 < rounds[1]["utilization"] <= 1
        assert [r["versions"] for r in steps] == [[i, i] for i in range(1, 21)]
        reference = unsharded_losses(load_node_config(str(config)).run, corpus, 20)
        assert relative_gap([r["loss"] for r in steps], reference) <= LOSS_TOLERANCE
        assert reference[-1] < reference[0]
        assert "step     20 | loss" in trainer.output()
    finally:
        for process in processes:
            process.stop()


@pytest.mark.slow
def test_a_stage_server_killed_mid_training_loses_no_step(tmp_path: Path) -> None:
    """Stage 1's server in use is SIGKILLed mid-run: the trainer reroutes to the replica; every step applies once."""
    # Prepare
    config = write_run_config(tmp_path / "run.toml", train={"inner_steps": 40}, **SHARDED_RUN)
    corpus = generate_corpus(30_000, seed=12)
    processes: list[NodeProcess] = []
    try:
        first, _, maddr = serve(tmp_path, "s0", config, None, "--stages", "0")
        processes.append(first)
        replicas = [serve(tmp_path, f"s1-{i}", config, maddr, "--stages", "1")[0] for i in range(2)]
        processes += replicas
        trainer = NodeProcess(tmp_path, "trainer", config, maddr, corpus, "--rounds", "2")
        processes.append(trainer)

        # Execute
        wait_until(
            lambda: len(trainer.steps()) >= 10 or trainer.process.poll() is not None,
            90,
            "10 sharded steps",
            detail=trainer.tail,
            interval=0.05,
        )
        in_use = trainer.steps()[-1]["servers"][1]
        victim = next(r for r in replicas if r.peer_id.startswith(in_use))
        killed_at = len(trainer.steps())
        victim.crash()
        code = trainer.wait(120)

        # Assert
        assert code == 0, trainer.output()[-3000:]
        assert 10 <= killed_at < 80
        steps = trainer.steps()
        assert [r["step"] for r in steps] == list(range(1, 81))
        assert [r["versions"] for r in steps] == [[i, i] for i in range(1, 81)]
        later = steps[killed_at + 1 :]  # after the step in flight when it died: the other replica's
        assert later and all(r["servers"][1] != in_use for r in later), [r["servers"] for r in steps]
        # a call that found the victim dead moved on (a failover), unless the trainer had already moved to the other
        # replica: it ranks replicas by latency and load and may switch just before the crash (the likely cause of
        # 0 failovers in a fresh-clone CI run on a loaded 2-core box, 2026-12-05)
        moved_before = all(r["servers"][1] != in_use for r in steps[killed_at:])
        assert steps[-1]["failovers"] >= 1 or moved_before, [r["servers"] for r in steps]
        assert all(
            not r["servers"][1] or not victim.peer_id.startswith(r["servers"][1]) for r in steps[killed_at + 1 :]
        )
        reference = unsharded_losses(load_node_config(str(config)).run, corpus, 80)
        assert relative_gap([r["loss"] for r in steps], reference) <= LOSS_TOLERANCE
    finally:
        for process in processes:
            process.stop()


class PerturbingServer(StageServer):
    """A cheating server: its forward outputs are shifted, while it publishes its honest weights."""

    def _host(self, stage: int, records: list) -> None:  # type: ignore[type-arg]
        super()._host(stage, records)
        honest = self.hosted[stage].forward
        self.hosted[stage].forward = lambda hidden: honest(hidden) + 0.05  # type: ignore[method-assign]


def test_a_server_returning_perturbed_activations_is_banned(tmp_path: Path) -> None:
    """Spot-checks catch the shifted activations: a signed ban with the evidence digest, and the step reroutes."""
    # Prepare
    cheater = PerturbingServer(node_config(tmp_path, "cheater", []), ServeConfig(rebalance_period=0)).start()
    initial = list(cheater.maddrs)
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=4))
    trainer_config = node_config(tmp_path, "trainer", initial)
    trainer_config.data = str(tmp_path / "data.txt")
    trainer = ShardedTrainer(trainer_config)
    honest: StageServer | None = None
    try:
        trainer.prepare()
        trainer.join()
        first: list[StepReport] = []
        stepping = threading.Thread(target=lambda: first.append(trainer.train_step()))

        # Execute
        stepping.start()
        wait_until(lambda: trainer.remote.bans_published, 30, "the trainer to publish a ban", interval=0.05)
        honest = StageServer(node_config(tmp_path, "honest", initial), ServeConfig(rebalance_period=0)).start()
        stepping.join(timeout=60)
        later = [trainer.train_step() for _ in range(2)]
        published = list_bans(honest.dht, "shard")

        # Assert
        assert len(trainer.remote.bans_published) == 1
        ban = trainer.remote.bans_published[0]
        assert ban.banned == cheater.identity.peer_id and ban.stage == 0
        assert [b.banned for b in published] == [cheater.identity.peer_id]
        assert published[0].reporter == trainer.identity.peer_id
        evidence = msgpack.unpackb((trainer.workdir / "evidence" / f"{ban.evidence.hex()}.msgpack").read_bytes())
        assert evidence[:3] == [cheater.identity.peer_id, 0, ban.version] and ban.run_hash == trainer.run.digest()
        assert ban.evidence == evidence_digest(
            ban.run_hash, ban.banned, ban.stage, ban.version, ban.inputs_digest, ban.output_digest
        )
        envelope = bytearray(ban.sign(trainer.identity))
        envelope[-70] ^= 1  # inside the signed body
        with pytest.raises(BanError):
            BanRecord.verify(bytes(envelope))
        assert [r.step for r in first + later] == [1, 2, 3]
        assert [r.versions for r in first + later] == [[1], [2], [3]]
        assert all(honest.identity.peer_id.startswith(r.servers[0]) for r in first + later)
        assert trainer.remote.stats["spot_checks"] >= 4
    finally:
        trainer.close()
        for server in (honest, cheater):
            if server is not None:
                server.shutdown()


def test_a_serve_node_whose_gpu_is_busy_refuses_work_and_malformed_requests(tmp_path: Path) -> None:
    """While the (faked) NVML reading says another process uses the GPU, forward is refused; junk never crashes."""
    # Prepare
    gpu_in_use = threading.Event()
    serve_config = ServeConfig(busy_poll=0.05, rebalance_period=0)
    server = StageServer(node_config(tmp_path, "server", []), serve_config, gpu_probe=gpu_in_use.is_set).start()
    client = start_dht(SwarmConfig(host_maddrs=[LOCALHOST_MADDR], initial_peers=list(server.maddrs)), None, ["shard"])
    loop = P2PLoop(client, "test-client")
    me = client.peer_id.to_base58()
    name = stage_handler_name("shard")
    hidden = torch.randn(2, 8, 32)

    def forward(trainer: str = me) -> StageReply:
        request = StageRequest("forward", 0, trainer, 1, tensors=(hidden,))
        return loop.run(call_stage(loop.p2p, server.identity.peer_id, name, request, 10.0), timeout=15)

    async def junk(payload: bytes) -> StageReply:
        message = runtime_pb2.ExpertRequest(metadata=payload)
        peer = PeerID.from_base58(server.identity.peer_id)
        response = await loop.p2p.call_protobuf_handler(peer, name, message, runtime_pb2.ExpertResponse)
        return StageReply.decode(response.metadata)

    try:
        # Execute
        idle = forward()
        gpu_in_use.set()
        wait_until(lambda: server.busy, 30, "the server to see its GPU busy", interval=0.02)
        busy = forward()
        gpu_in_use.clear()
        wait_until(lambda: not server.busy, 30, "the server to see its GPU free", interval=0.02)
        again = forward()
        garbage = loop.run(junk(b"\xc1 not msgpack"), timeout=15)
        impostor = forward(trainer=server.identity.peer_id)
        wrong_width = StageRequest("forward", 0, me, 1, tensors=(torch.randn(2, 8, 16),))
        misshapen = loop.run(call_stage(loop.p2p, server.identity.peer_id, name, wrong_width, 10.0), timeout=15)
        after = forward()

        # Assert
        assert idle.ok and idle.tensors[0].shape == hidden.shape
        assert not busy.ok and busy.reason == "busy"
        assert again.ok and torch.allclose(again.tensors[0], idle.tensors[0])
        assert not garbage.ok and "malformed" in garbage.reason
        assert not impostor.ok and "sent by" in impostor.reason
        assert not misshapen.ok and "hidden states must be" in misshapen.reason
        assert after.ok and server.refused == 3
    finally:
        loop.shutdown()
        client.shutdown()
        server.shutdown()


def start_replicas(tmp_path: Path, count: int, average_period: float = 0.0) -> list[StageServer]:
    """``count`` in-process servers of stage 0, each seeing all of them listed before this returns."""
    servers: list[StageServer] = []
    initial: list[str] = []
    serve_config = ServeConfig(rebalance_period=0, stages=(0,))
    for i in range(count):
        config = node_config(tmp_path, f"s{i}", initial, spot_check=0.0, average_period=average_period)
        servers.append(StageServer(config, serve_config).start())
        if not average_period:  # rounds run on demand: start the aggregators a periodic server starts itself
            servers[-1].averager.prepare(0, servers[-1].hosted[0].params)
        initial = initial or list(servers[0].maddrs)
    wait_until(
        lambda: all(len(s.rpc.run(s.stage_replicas(0), timeout=30)) >= count for s in servers),
        60,
        "the replicas to see each other's records",
    )
    return servers


def in_compute(server: StageServer, fn: Callable[[], object]) -> object:
    return server.rpc.run(server.in_compute(fn), timeout=30)


def shift_params(server: StageServer, offset: float) -> None:
    """Move every parameter of the server's stage 0 by ``offset`` without a step (a drifted replica)."""

    def shift() -> None:
        with torch.no_grad():
            for param in server.hosted[0].params:
                param.add_(offset)

    in_compute(server, shift)


def average_together(servers: list[StageServer]) -> list[str]:
    """Run one averaging round of stage 0 on every server at once; return their outcomes."""
    outcomes = [""] * len(servers)

    def one(i: int) -> None:
        outcomes[i] = servers[i].rpc.run(servers[i].averager.average(0), timeout=90)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(servers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


def test_drifted_replicas_of_a_stage_are_bit_identical_after_one_secure_averaging_round(tmp_path: Path) -> None:
    """Three replicas whose params drifted apart average securely and leave with the same bits and version."""
    # Prepare
    servers = start_replicas(tmp_path, 3)
    try:
        start = [p.detach().clone() for p in servers[0].hosted[0].params]
        offsets = [0.03, -0.01, 0.0]
        for server, offset in zip(servers, offsets, strict=True):
            shift_params(server, offset)

        # Execute
        outcomes = average_together(servers)

        # Assert
        assert outcomes == ["averaged"] * 3
        params = [[p.detach().clone() for p in s.hosted[0].params] for s in servers]
        for other in params[1:]:
            assert all(torch.equal(a, b) for a, b in zip(params[0], other, strict=True))
        mean_offset = sum(offsets) / 3
        assert all(torch.allclose(p, s + mean_offset, atol=1e-6) for p, s in zip(params[0], start, strict=True))
        assert [s.hosted[0].version for s in servers] == [1, 1, 1]
        assert len({s.hosted[0].anchor_digest for s in servers}) == 1
        assert all(s.averager.last[0].group_size == 3 for s in servers)
    finally:
        for server in servers:
            server.shutdown()


@pytest.mark.parametrize("count", [2, 3])
def test_replicas_that_cannot_average_copy_the_newest_state(tmp_path: Path, count: int) -> None:
    """One replica applied a step the others missed (2 servers: never secure): all end with its bits and version,
    and the step marked done (its trainer's proof travels with the state)."""
    # Prepare
    servers = start_replicas(tmp_path, count)
    trainer = NodeIdentity.load_or_create(tmp_path / "trainer")
    try:
        ahead = servers[-1]
        grads = [torch.full_like(p, 0.1) for p in ahead.hosted[0].params]
        digest = gradients_digest(grads)
        evidence = (digest, sign_step(trainer, ahead.run.digest(), 0, 7, digest))
        in_compute(ahead, lambda: ahead.hosted[0].apply((trainer.peer_id, 7), grads, evidence))
        expected = [p.detach().clone() for p in ahead.hosted[0].params]

        # Execute
        outcomes = average_together(servers)

        # Assert
        assert outcomes == ["resynced"] * (count - 1) + ["kept"]
        assert [s.hosted[0].version for s in servers] == [1] * count
        for server in servers:
            assert (trainer.peer_id, 7) in server.hosted[0].applied
            assert all(torch.equal(a, b) for a, b in zip(server.hosted[0].params, expected, strict=True))
            assert server.hosted[0].anchor_digest == ahead.hosted[0].anchor_digest
    finally:
        for server in servers:
            server.shutdown()


def interleaved_reference(
    run: RunConfig, corpora: list[bytes], order: list[int]
) -> tuple[list[list[float]], list[torch.Tensor]]:
    """Trainers with their own local parts and one shared remote stage, stepping in ``order``, on one machine: each
    trainer's losses, and the stage's params after (each trainer's step moves it at 1 / the trainers' share)."""
    stage = build_stage(run.model, run.sharding, run.train.seed, 0)
    stage_lr = run.train.inner_lr * run.sharding.stage_lr_scale / len(corpora)
    stage_optimizer = torch.optim.AdamW(stage.parameters(), lr=stage_lr, weight_decay=run.train.weight_decay)
    parts = [LocalParts(build_model(run.model, run.train.seed), run.sharding.local_blocks) for _ in corpora]
    optimizers = [
        torch.optim.AdamW(p.parameters(), lr=run.train.inner_lr, weight_decay=run.train.weight_decay) for p in parts
    ]
    batches = [training_batches(run, corpus) for corpus in corpora]
    losses: list[list[float]] = [[] for _ in corpora]
    for t in order:
        tokens, targets = batches[t].next()
        loss = parts[t].head(stage(parts[t].front(tokens)), targets)
        stage_optimizer.zero_grad(set_to_none=True)
        optimizers[t].zero_grad(set_to_none=True)
        loss.backward()
        stage_optimizer.step()
        optimizers[t].step()
        losses[t].append(loss.item())
    return losses, [p.detach().clone() for p in stage.parameters()]


def test_two_trainers_share_the_stage_servers_without_losing_or_repeating_a_step(tmp_path: Path) -> None:
    """Two trainers: in lockstep they match the one-machine reference (each step at half the stage's lr: they count
    two trainers); concurrently every step applies exactly once."""
    # Prepare
    (server,) = start_replicas(tmp_path, 1)
    corpora = [generate_corpus(20_000, seed=21), generate_corpus(20_000, seed=22)]
    trainers: list[ShardedTrainer] = []
    try:
        for i, corpus in enumerate(corpora):
            (tmp_path / f"data{i}.txt").write_bytes(corpus)
            config = node_config(tmp_path, f"trainer{i}", list(server.maddrs), spot_check=0.0)  # the servers' run
            config.data = str(tmp_path / f"data{i}.txt")
            trainers.append(ShardedTrainer(config))
            trainers[-1].prepare()
            trainers[-1].join()
        wait_until(lambda: all(t.count_trainers() == 0.5 for t in trainers), 30, "each trainer to count two trainers")
        lockstep_steps, concurrent_steps = 4, 4

        # Execute
        lockstep: list[list[StepReport]] = [[], []]
        for _ in range(lockstep_steps):
            for i, trainer in enumerate(trainers):
                lockstep[i].append(trainer.train_step())
        after_lockstep = [p.detach().clone() for p in server.hosted[0].params]
        concurrent: list[list[StepReport]] = [[], []]

        def train(i: int) -> None:
            concurrent[i] += [trainers[i].train_step() for _ in range(concurrent_steps)]

        threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

        # Assert
        reference, stage_params = interleaved_reference(trainers[0].run, corpora, [0, 1] * lockstep_steps)
        # each step moved the shared stage at half the lr: as far as one trainer's steps would
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(after_lockstep, stage_params, strict=True))
        for i in range(2):
            assert relative_gap([r.loss for r in lockstep[i]], reference[i]) <= LOSS_TOLERANCE
            assert [r.versions[0] for r in lockstep[i]] == [2 * k + i + 1 for k in range(lockstep_steps)]
            versions = [r.versions[0] for r in lockstep[i] + concurrent[i]]
            assert versions == sorted(set(versions))  # each trainer sees the stage only move forward
            assert len(concurrent[i]) == concurrent_steps
            assert all(math.isfinite(r.loss) and r.loss < lockstep[i][0].loss * 1.05 for r in concurrent[i])
        total = 2 * (lockstep_steps + concurrent_steps)
        hosted = server.hosted[0]
        assert hosted.version == total
        step_ids = {(t.identity.peer_id, (t.session << 24) | s) for t in trainers for s in range(t.step)}
        assert set(hosted.applied) == step_ids and len(step_ids) == total
    finally:
        for trainer in trainers:
            trainer.close()
        server.shutdown()


@pytest.mark.slow
def test_periodic_averaging_while_two_trainers_train_leaves_replicas_identical(tmp_path: Path) -> None:
    """Three replicas average every 3 s under two concurrent trainers; after a quiet round they hold the same bits."""
    # Prepare
    servers = start_replicas(tmp_path, 3, average_period=3.0)
    trainers: list[ShardedTrainer] = []
    try:
        for i in range(2):
            (tmp_path / f"data{i}.txt").write_bytes(generate_corpus(20_000, seed=31 + i))
            config = node_config(tmp_path, f"trainer{i}", list(servers[0].maddrs), spot_check=0.0, average_period=3.0)
            config.data = str(tmp_path / f"data{i}.txt")
            trainers.append(ShardedTrainer(config))
            trainers[-1].prepare()
            trainers[-1].join()
        reports: list[list[StepReport]] = [[], []]

        def train(i: int) -> None:
            rounds = servers[0].averager.rounds
            while servers[0].averager.rounds < rounds + 2 or len(reports[i]) < 5:
                reports[i].append(trainers[i].train_step())

        # Execute
        threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        quiet = max(s.averager.rounds for s in servers) + 2  # a whole round that began after the last step
        assert all(s.averager.wait_for_rounds(quiet, timeout=60) for s in servers)
        for extra in range(1, 5):  # a quiet round that failed on a loaded machine is mended by the next (resync)
            if len({s.hosted[0].version for s in servers}) == 1:
                break
            assert all(s.averager.wait_for_rounds(quiet + extra, timeout=60) for s in servers)

        # Assert
        assert all(s.averager.stats["averaged"] >= 2 for s in servers)
        hosted = [s.hosted[0] for s in servers]
        assert len({h.version for h in hosted}) == 1
        for other in hosted[1:]:
            assert all(torch.equal(a, b) for a, b in zip(hosted[0].params, other.params, strict=True))
        step_ids = {(t.identity.peer_id, (t.session << 24) | s) for t in trainers for s in range(t.step)}
        assert all(step_ids <= set(h.applied) for h in hosted)
        for i in range(2):
            versions = [r.versions[0] for r in reports[i]]
            assert versions == sorted(set(versions)) and all(math.isfinite(r.loss) for r in reports[i])
    finally:
        for trainer in trainers:
            trainer.close()
        for server in servers:
            server.shutdown()


def test_the_default_stage_lr_scale_keeps_the_run_hash_and_another_changes_it() -> None:
    """Runs from before ``sharding.stage_lr_scale`` keep their hash (checkpoints resume); another scale is another
    run; a scale outside (0, 1] is refused in one line."""
    sharded = RunConfig(model=ModelConfig(n_layer=3), sharding=ShardingConfig(stages=2))
    halved = dataclasses.replace(sharded, sharding=ShardingConfig(stages=2, stage_lr_scale=0.5))
    assert "stage_lr_scale" not in sharded.shared_dict()["sharding"]
    assert sharded.digest() != halved.digest()
    for scale in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"sharding\.stage_lr_scale must be in \(0, 1\]"):
            ShardingConfig(stages=2, stage_lr_scale=scale)
