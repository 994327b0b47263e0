"""Sharded trainers average their own parts (node/sharding/fronts.py): real stage server, real secure rounds.

Three in-process trainers on different text train against one real stage server on 127.0.0.1; at the end
of each round they average their embeddings, first block and head through the masked all-reduce. Before,
each trainer's parts stayed its own: three different fronts and heads around one shared middle.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from sharding_harness import node_config, start_servers

from node.data import generate_corpus
from node.model import build_model
from node.sharding.server import StageServer
from node.sharding.stages import LocalParts
from node.sharding.trainer import ShardedTrainer, StepReport

ROUNDS = 2


def test_three_sharded_trainers_leave_each_round_with_the_same_own_parts(tmp_path: Path) -> None:
    # Prepare
    (server,) = start_servers(tmp_path, [StageServer])
    trainers: list[ShardedTrainer] = []
    reports: list[list[StepReport]] = [[], [], []]
    try:
        for i in range(3):
            (tmp_path / f"data{i}.txt").write_bytes(
                generate_corpus(20_000, seed=41 + i, style=("prose", "digits")[i % 2])
            )
            config = node_config(tmp_path, f"trainer{i}", list(server.maddrs), spot_check=0.0)
            config.data = str(tmp_path / f"data{i}.txt")
            trainers.append(ShardedTrainer(config))
            trainers[-1].prepare()
            trainers[-1].join()  # on the main thread: it starts the trainers' aggregator
        steps = trainers[0].run.train.inner_steps  # the run's (the server's run hash covers it)
        initial = LocalParts(build_model(trainers[0].run.model, trainers[0].run.train.seed), 1)

        def train(i: int) -> None:
            reports[i] += [trainers[i].train_step() for _ in range(ROUNDS * steps)]

        # Execute
        threads = [threading.Thread(target=train, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)

        # Assert
        assert all(len(r) == ROUNDS * steps for r in reports), [len(r) for r in reports]
        groups = [[r.group for r in rows] for rows in reports]
        assert all(g[steps - 1 :: steps] == [3] * ROUNDS for g in groups), groups  # every round
        assert all(g.count(0) == len(g) - ROUNDS for g in groups)  # only at a round's last step
        parts = [list(t.local.parameters()) for t in trainers]
        for other in parts[1:]:
            assert all(torch.equal(a, b) for a, b in zip(parts[0], other, strict=True))  # one set of parts
        moved = max(float((a - b).detach().abs().max()) for a, b in zip(parts[0], initial.parameters(), strict=True))
        assert moved > 1e-3  # they trained
        assert all(t.fronts is not None and t.fronts.stats["averaged"] == ROUNDS for t in trainers)
    finally:
        for trainer in trainers:
            trainer.close()
        server.shutdown()
