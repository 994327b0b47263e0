"""A sharded trainer's receipts: it averages in no group, so each round of ``train.inner_steps`` steps it
committed to the stage servers earns a receipt of outcome ``sharded`` (U = itself, its samples and the steps'
seconds), and its summary reaches the DHT and ``zen-node ledger``'s listing (node/sharding/trainer.py).

A real in-process stage server and trainer on 127.0.0.1 (sharding_harness), real keys and signatures.
"""

from __future__ import annotations

from pathlib import Path

from sharding_harness import node_config

from dht.config import SwarmConfig
from dht.ledger import list_summaries
from node.config import NodeConfig, ServeConfig
from node.data import generate_corpus
from node.ledger.listing import read_run_ledger
from node.ledger.receipts import SHARDED, certificate_verdict, read_receipts
from node.sharding.server import StageServer
from node.sharding.trainer import ShardedTrainer

INNER_STEPS = 2
BATCH = 4  # sharding_harness's train.batch_size


def _config(tmp_path: Path, name: str, initial: list[str], rounds: int = 0) -> NodeConfig:
    """The harness's sharded run with rounds of ``INNER_STEPS`` steps (the server's run must hash the same)."""
    config = node_config(tmp_path, name, initial, spot_check=0.0)
    config.run.train.inner_steps = INNER_STEPS
    config.rounds = rounds
    config.data = str(tmp_path / "data.txt")
    return config


def _train(config: NodeConfig) -> ShardedTrainer:
    """Prepare, join and run a trainer to its ``node.rounds``, then stop it (its summary is published at stop)."""
    trainer = ShardedTrainer(config)
    try:
        trainer.prepare()
        trainer.join()
        trainer.run_forever()
    finally:
        trainer.close()
    return trainer


def test_a_sharded_trainer_keeps_a_receipt_per_round_and_publishes_its_summary(tmp_path: Path) -> None:
    """2 rounds of 2 steps: 2 signed receipts (no group, U = the trainer, 8 samples each); a restart numbers its
    round on (3); the DHT summary and the ledger listing show 3 verified rounds and 24 samples."""
    # Prepare
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=4))
    server = StageServer(_config(tmp_path, "server", []), ServeConfig(rebalance_period=0)).start()
    initial = list(server.maddrs)
    try:
        # Execute
        first = _train(_config(tmp_path, "trainer", initial, rounds=2))
        after_first = read_receipts(first.workdir, first.run.digest())
        second = _train(_config(tmp_path, "trainer", initial, rounds=1))  # the same node, restarted
        receipts, failed = read_receipts(second.workdir, second.run.digest())
        held = [e.summary for e in list_summaries(server.dht, second.run.run_id) if e.summary is not None]
        swarm = SwarmConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial)
        rows = read_run_ledger(swarm, second.run)
    finally:
        server.shutdown()

    # Assert
    me = first.identity.peer_id
    assert after_first[1] == 0 and [s.receipt.round for s in after_first[0]] == [1, 2]
    assert failed == 0 and [s.receipt.round for s in receipts] == [1, 2, 3]
    for signed in receipts:
        receipt = signed.receipt
        assert (receipt.peer_id, receipt.contributors, receipt.group_id) == (me, (me,), "")
        assert receipt.outcome == SHARDED and receipt.samples == INNER_STEPS * BATCH and receipt.compute_seconds > 0
        assert certificate_verdict(receipt).note == "no certificate (a sharded trainer's steps, averaged in no group)"
    assert [(s.peer_id, s.rounds, s.samples, s.last_round) for s in held] == [(me, 3, 3 * INNER_STEPS * BATCH, 3)]
    assert [(r.peer_id, r.rounds, r.samples, r.verified) for r in rows] == [(me, 3, 24, True)]
