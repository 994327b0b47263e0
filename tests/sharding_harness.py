"""A harness for sharding attack tests: in-process stage servers on 127.0.0.1 and the deviants among them.

``node_config`` is the small sharded run every in-process test shares; ``start_servers`` starts one
real ``StageServer`` per class (real libp2p, real signatures) and returns once each sees all of them
listed. The deviants are stage servers that attack their replicas or trainers: ``ProofKeeper``
keeps the step proofs it is sent (what a malicious replica replays), ``TamperedServer`` serves
shifted weights consistently, ``LyingDonor`` answers ``state`` with a poisoned state (``shifted_params``,
``runaway_moments``). ``signed_ban`` is a well-formed ban. Tests import it as ``from sharding_harness
import ...``, and so does ``benchmarks/integrity.py`` (it puts ``tests/`` on ``sys.path``); nothing
here is a test.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from helpers import LOCALHOST_MADDR, wait_until
from hivemind.utils import get_dht_time

from dht import NodeIdentity, PeerRecord, SwarmConfig
from dht.bans import BanRecord, evidence_digest
from node.config import (
    AggregationConfig,
    ModelConfig,
    NodeConfig,
    RunConfig,
    ServeConfig,
    ShardingConfig,
    TrainConfig,
)
from node.data import generate_corpus
from node.sharding.hosted import HostedStage
from node.sharding.messages import StageReply, StageRequest
from node.sharding.server import StageServer
from node.sharding.trainer import ShardedTrainer


def node_config(
    tmp_path: Path,
    name: str,
    initial: list[str],
    spot_check: float = 1.0,
    average_period: float = 0.0,
    **run_fields: Any,
) -> NodeConfig:
    """An in-process node's config: one remote stage (blocks 1-2 of a 3-block GPT), every call spot-checked.

    ``run_fields`` replace fields of the run (e.g. ``cohorts=CohortConfig(enabled=True)``): every node of a
    test must get the same ones (the run hash covers them).
    """
    run = RunConfig(
        run_id="shard",
        min_memory_gb=0.0,
        model=ModelConfig(n_layer=3, d_model=32, context=32),
        train=TrainConfig(batch_size=4),
        aggregation=AggregationConfig(matchmaking_time=1.0, timeout=6.0),
        sharding=ShardingConfig(
            stages=1,
            local_blocks=1,
            request_timeout=3.0,
            spot_check_fraction=spot_check,
            average_period=average_period,
        ),
    )
    swarm = SwarmConfig(host_maddrs=[LOCALHOST_MADDR], initial_peers=initial)
    folder = tmp_path / name
    return NodeConfig(
        run=dataclasses.replace(run, **run_fields),
        swarm=swarm,
        identity=str(folder / "id"),
        workdir=str(folder / "work"),
        device="cpu",
        heartbeat_period=1.0,
        record_ttl=6.0,
    )


class ProofKeeper(StageServer):
    """A listed replica of the stage that keeps every step proof it is sent (what a malicious one replays)."""

    proofs: list[bytes]

    async def _dispatch(self, request: StageRequest, remote: str) -> StageReply:
        if request.proof:
            self.proofs.append(request.proof)
        return await super()._dispatch(request, remote)


def victim_trainer(tmp_path: Path, servers: list[StageServer], seed: int) -> ShardedTrainer:
    """A sharded trainer of the servers' run on a generated corpus (not started: prepare() and join() it)."""
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=seed))
    config = node_config(tmp_path, "victim", list(servers[0].maddrs), spot_check=0.0)
    config.data = str(tmp_path / "data.txt")
    return ShardedTrainer(config)


class ShareInflater(StageServer):
    """Relays every step it commits to the other replicas at a full share of the stage's lr, whatever the trainer
    signed (a step then moves the shared blocks as if one trainer trained alone)."""

    async def _send_to_replicas(self, replicate: StageRequest) -> None:
        await super()._send_to_replicas(dataclasses.replace(replicate, share=1.0))


class TamperedServer(StageServer):
    """Serves stage weights shifted by 0.02 and computes with them: its forward matches its published state."""

    def _host(self, stage: int, records: list[PeerRecord]) -> None:
        super()._host(stage, records)
        with torch.no_grad():
            for param in self.hosted[stage].params:
                param.add_(0.02)


Poison = Callable[[HostedStage], list[torch.Tensor]]  # a stage's state, as a lying donor serves it


class LyingDonor(StageServer):
    """Answers ``state`` with a poisoned state at a version of its choice, for replicas that mend from it.

    Set ``lie`` before a replica asks: ``(version, poison)``, where ``poison(hosted)`` returns the four
    blocks to serve (params, two Adam moments, anchor); None answers honestly. ``history`` is the
    history its state claims (None: its own).
    """

    lie: tuple[int, Poison] | None = None
    history: bytes | None = None

    async def _state(self, request: StageRequest, hosted: HostedStage) -> StageReply:
        if self.lie is None:
            return await super()._state(request, hosted)
        version, poison = self.lie
        tensors = tuple(t.detach().cpu().clone() for t in await self.in_compute(poison, hosted))
        history = hosted.history if self.history is None else self.history
        return StageReply(ok=True, version=version, applied=(), tensors=tensors, history=history)


def shifted_params(hosted: HostedStage) -> list[torch.Tensor]:
    """The stage's state with every parameter moved by 5 (finite, and ruinous to the model)."""
    count = len(hosted.params)
    return [t + 5.0 if i < count else t for i, t in enumerate(hosted.state())]


def runaway_moments(hosted: HostedStage) -> list[torch.Tensor]:
    """The stage's own params and anchor, with first moments of 1 over second moments of 0 (a huge next step)."""
    state, count = hosted.state(), len(hosted.params)
    moments = [torch.ones_like(p) for p in hosted.params] + [torch.zeros_like(p) for p in hosted.params]
    return [*state[:count], *moments, *state[3 * count :]]


def start_servers(
    tmp_path: Path, classes: list[type[StageServer]], spot_check: float = 0.0, **run_fields: Any
) -> list[StageServer]:
    """In-process servers of stage 0, one per class, each seeing all of them listed before this returns.

    ``spot_check`` and ``run_fields`` (``node_config``'s) are part of the run's hash: the trainer's config must use
    the same.
    """
    servers: list[StageServer] = []
    initial: list[str] = []
    for i, cls in enumerate(classes):
        config = node_config(tmp_path, f"s{i}", initial, spot_check=spot_check, **run_fields)
        server = cls(config, ServeConfig(rebalance_period=0, stages=(0,)))
        server.proofs = []  # type: ignore[attr-defined]
        servers.append(server.start())
        initial = initial or list(servers[0].maddrs)
    wait_until(
        lambda: all(len(s.rpc.run(s.stage_replicas(0), timeout=30)) >= len(classes) for s in servers),
        60,
        "the servers to see each other's records",
    )
    return servers


def signed_ban(reporter: NodeIdentity, banned: str, run_hash: str, stage: int = 0, ttl: float = 60.0) -> bytes:
    """A well-formed ban of ``banned`` by ``reporter``, its evidence digest right (the digests are of nothing)."""
    inputs, output = os.urandom(32), os.urandom(32)
    return BanRecord(
        reporter=reporter.peer_id,
        signing_key=reporter.signing_public_key,
        binding=reporter.binding,
        banned=banned,
        stage=stage,
        reason="stage 0 forward differs from recomputation by 0.5 (tolerance 0.001)",
        evidence=evidence_digest(run_hash, banned, stage, 3, inputs, output),
        timestamp=get_dht_time(),
        run_hash=run_hash,
        version=3,
        inputs_digest=inputs,
        output_digest=output,
        ttl=ttl,
    ).sign(reporter)
