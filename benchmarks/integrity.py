"""Attacks on what a node accepts (issue 15): one row per attack, the model's loss against an honest run.

Real in-process stage servers and a sharded trainer on 127.0.0.1 (real libp2p, real signatures),
built with the sharding harness (``tests/sharding_harness.py``, shared with the tests). Each
scenario trains ``--steps`` steps with an attacker present, and the same length with honest peers
only; the held-out loss is the trainer's local parts around an honest replica's stage weights, on
batches of a corpus no one trained on::

    python benchmarks/integrity.py --json
    python benchmarks/attacks.py --integrity --json   # the same rows, from the attacks benchmark

Row fields: ``attack``, ``built`` (false: no scenario yet, every other field null), ``loss_vs_honest``
(the honest nodes' final held-out loss over an honest run's of the same length), ``detected`` (the
attacker was named or refused, see ``details``), ``honest_banned`` (honest servers the trainer
excludes), ``seconds``, ``details``, ``error``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hivemind.utils import get_dht_time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the harness lives with the tests

from helpers import wait_until
from sharding_harness import ProofKeeper, TamperedServer, node_config, signed_ban, start_servers

from dht import SKETCH_DIM, Capacity, NodeIdentity, PeerRecord, encode_sketch, publish_record
from dht.bans import list_bans, publish_ban
from node.data import generate_corpus
from node.sharding.messages import StageRequest
from node.sharding.proofs import gradients_digest, sign_step
from node.sharding.server import StageServer
from node.sharding.trainer import ShardedTrainer, training_batches

logger = logging.getLogger(__name__)

Row = dict[str, Any]
NOT_BUILT = {  # attack -> where it is tested today (no benchmark scenario yet)
    "weight_poisoning": "tests/test_loss_gate.py (tests/deviant_node.py poison-mean, real processes)",
    "value_range_poisoning": "benchmarks/attacks.py forged_weight_word / value_range rows (no loss figure)",
    "poisoned_donor": "tests/test_verified_state.py (a joiner against two honest donors and a poisoned one)",
}


def sybil_record(sybil: NodeIdentity, run_hash: str) -> PeerRecord:
    """A trainer record of this run that claims no rounds (it has taken part in nothing)."""
    return PeerRecord(
        peer_id=sybil.peer_id,
        signing_key=sybil.signing_public_key,
        binding=sybil.binding,
        x25519_key=sybil.x25519_public_key,
        version="0.1.0",
        run_hash=run_hash,
        capacity=Capacity(device_kind="cpu", device_name="sybil", memory_bytes=2**34),
        sketch=encode_sketch([0.0] * SKETCH_DIM),
        roles=("trainer",),
        round=0,
        state_digest=b"",
        timestamp=get_dht_time(),
    )


class Scene:
    """Servers of stage 0 and one trainer in ``folder``; ``close()`` stops them all."""

    def __init__(self, folder: Path, classes: list[type[StageServer]], seed: int, steps: int):
        self.folder, self.steps = folder, steps
        self.servers = start_servers(folder, classes, spot_check=1.0)
        (folder / "data.txt").write_bytes(generate_corpus(40_000, seed=seed))
        config = node_config(folder, "trainer", list(self.servers[0].maddrs), spot_check=1.0)
        config.data = str(folder / "data.txt")
        self.trainer = ShardedTrainer(config)
        self.trainer.prepare()
        self.trainer.join()
        assert self.trainer.remote is not None
        self.remote = self.trainer.remote

    def train(self, skip: int = 0) -> None:
        """Train until ``steps`` steps are done (``skip``: already done by the scenario)."""
        for _ in range(self.steps - skip):
            self.trainer.train_step()

    def held_out_loss(self, honest: StageServer, seed: int, batches: int = 4) -> float:
        """Mean loss of the trainer's local parts around ``honest``'s stage weights on an unseen corpus."""
        run, local = self.trainer.run, self.trainer.local
        held_out = training_batches(run, generate_corpus(20_000, seed=seed + 1000))
        module = honest.hosted[0].module
        losses = []
        with torch.no_grad():
            for _ in range(batches):
                tokens, targets = held_out.next()
                losses.append(float(local.head(module(local.front(tokens)), targets)))
        return sum(losses) / len(losses)

    def honest_banned(self, honest: list[StageServer]) -> int:
        """Honest servers the trainer excludes (its own bans, or a quorum of counted ones)."""
        self.remote.servers(0)  # refreshes the view of bans
        return sum(s.identity.peer_id in self.remote.banned for s in honest)

    def close(self) -> None:
        self.trainer.close()
        for server in self.servers:
            server.shutdown()


Outcome = tuple[list[StageServer], bool, Row]  # the honest servers, whether the attack was detected, details


def wrong_weights(scene: Scene) -> Outcome:
    """Two honest replicas and one serving shifted weights consistently (spot-checks pass)."""
    scene.train()
    bans = scene.remote.bans_published
    cheater = scene.servers[2].identity.peer_id
    reasons = [b.reason[:100] for b in bans]
    return scene.servers[:2], [b.banned for b in bans] == [cheater], {"bans": len(bans), "reasons": reasons}


def preemption(scene: Scene) -> Outcome:
    """A listed server replicates the trainer's next 3 steps with forged gradients under its own proof."""
    scene.trainer.train_step()
    honest, attacker = scene.servers[:2], scene.servers[2]
    trainer = scene.trainer.identity.peer_id
    forged = tuple(torch.full_like(p, 5.0).cpu() for p in attacker.hosted[0].params)
    refused = 0
    for s in range(1, 4):
        step = (scene.trainer.session << 24) | s
        proof = sign_step(attacker.identity, attacker.run.digest(), 0, step, gradients_digest(forged))
        for server in honest:
            request = StageRequest("replicate", 0, trainer, step, 0, 1, forged, proof, version=2)
            refused += not attacker.rpc.run(attacker.call(server.identity.peer_id, request), timeout=30).ok
    scene.train(skip=1)
    return honest, refused == 6, {"forged_replications_refused": refused}


def sybil_bans(scene: Scene) -> Outcome:
    """A Sybil trainer record that has taken part in nothing bans every server of the stage."""
    sybil = NodeIdentity.load_or_create(scene.folder / "sybil")
    run_hash, dht = scene.trainer.run.digest(), scene.servers[0].dht
    publish_record(dht, "shard", sybil_record(sybil, run_hash).sign(sybil))
    for server in scene.servers:
        publish_ban(dht, "shard", signed_ban(sybil, server.identity.peer_id, run_hash))
    wait_until(lambda: len(list_bans(dht, "shard")) == len(scene.servers), 30, "the Sybil's bans to be stored")
    scene.train()
    scene.remote.servers(0)
    ignored = not (scene.remote.banned | scene.remote.suspected)
    return scene.servers, ignored, {"sybil_bans_stored": len(scene.servers), "all_ignored": ignored}


SCENARIOS: dict[str, tuple[list[type[StageServer]], Callable[[Scene], Outcome]]] = {
    "consistent_wrong_weights": ([StageServer, StageServer, TamperedServer], wrong_weights),
    "replication_preemption": ([StageServer, StageServer, ProofKeeper], preemption),
    "sybil_bans": ([StageServer, StageServer, StageServer], sybil_bans),
}
ATTACKS = [*SCENARIOS, *NOT_BUILT]


def honest_loss(folder: Path, steps: int, seed: int) -> float:
    """The held-out loss after ``steps`` steps with three honest replicas."""
    scene = Scene(folder, [StageServer] * 3, seed, steps)
    try:
        scene.train()
        return scene.held_out_loss(scene.servers[0], seed)
    finally:
        scene.close()


def run_row(name: str, folder: Path, steps: int, seed: int, baseline: float) -> Row:
    """One attack's row (never raises: a failure is the row's ``error``)."""
    row: Row = {"attack": name, "built": name in SCENARIOS, "loss_vs_honest": None, "detected": None}
    row |= {"honest_banned": None, "seconds": None, "details": {}, "error": None}
    if name not in SCENARIOS:
        row["details"] = {"tested_in": NOT_BUILT[name]}
        return row
    classes, scenario = SCENARIOS[name]
    started = time.perf_counter()
    scene: Scene | None = None
    try:
        scene = Scene(folder, classes, seed, steps)
        honest, detected, details = scenario(scene)
        loss = scene.held_out_loss(honest[0], seed)
        details["held_out_loss"] = round(loss, 6)
        row |= {"loss_vs_honest": round(loss / baseline, 6), "detected": detected, "details": details}
        row["honest_banned"] = scene.honest_banned(honest)
    except Exception as e:
        logger.exception(f"attack {name} failed")
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        if scene is not None:
            scene.close()
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def run_rows(names: list[str], steps: int = 6, seed: int = 7) -> Row:
    """The honest run's held-out loss and one row per attack in ``names``."""
    with tempfile.TemporaryDirectory(prefix="zen-integrity-") as tmp:
        baseline = honest_loss(Path(tmp) / "honest", steps, seed)
        rows = [run_row(name, Path(tmp) / name, steps, seed, baseline) for name in names]
    return {"steps": steps, "honest_held_out_loss": round(baseline, 6), "attacks": rows}


def main(argv: list[str] | None = None) -> int:
    """Run the rows named by ``--only`` (all by default) and print them; ``argv`` defaults to sys.argv's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"attacks to run, e.g. sybil_bans; of {', '.join(ATTACKS)}")
    parser.add_argument("--steps", type=int, default=6, help="trainer steps per run, e.g. 6")
    parser.add_argument("--json", action="store_true", help="print one JSON line, e.g. --json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [n for n in args.only.split(",") if n] or ATTACKS
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attack(s) {unknown}; choose from {ATTACKS}")
    report = run_rows(names, args.steps)
    if args.json:
        print(json.dumps(report))
    else:
        for row in report["attacks"]:
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
