"""What averaging sharded trainers' own parts is worth: held-out loss with and without it.

A sharded run's trainers keep their embeddings, first blocks and head; the middle blocks live on
stage servers. node/sharding/fronts.py averages the trainers' parts every round. This benchmark
trains the same run twice, in process, on 127.0.0.1 (one real stage server, real libp2p, the
masked all-reduce): ``separate`` (the trainers' parts stay their own, as before fronts.py),
``averaged`` (each trainer waits for its round's group) and ``overlapped``
(``sharding.overlap_averaging``: the round averages in the background and its mean lands during the
next); the same data, seeds and steps. Each trainer holds one slice of the text (its
held-out part is the slice's last tenth). Per arm it reports the trainers' mean held-out loss on
their own slices (``loss_own``) and on every slice (``loss_all``: what the model the trainer holds
is worth to the run), each through that trainer's parts and the server's stage.

The run is the sharding tests' small one (tests/sharding_harness.py: 3 blocks, width 32, context
32, block 0 local, blocks 1-2 one stage, batch 4, 5 steps a round).

    python benchmarks/sharded_fronts.py --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the harness lives with the tests

from sharding_harness import node_config, start_servers

from node.data import ByteBatches, split_corpus
from node.sharding.server import StageServer
from node.sharding.stages import build_stage
from node.sharding.trainer import ShardedTrainer

ROOT = Path(__file__).resolve().parents[1]
EVAL_BATCHES = 8  # held-out batches of 32 windows per slice


def held_out_loss(trainer: ShardedTrainer, server: StageServer, held_out: bytes) -> float:
    """The loss of the trainer's parts around the server's stage 0 on ``held_out`` (fixed windows)."""
    run = trainer.run
    stage = build_stage(run.model, run.sharding, run.train.seed, 0)
    batches = ByteBatches(held_out, run.model.context, 32, seed=0)
    with torch.no_grad():
        for param, value in zip(stage.parameters(), server.hosted[0].params, strict=True):
            param.copy_(value)
        losses = []
        for _ in range(EVAL_BATCHES):
            tokens, targets = batches.next()
            losses.append(float(trainer.local.head(stage(trainer.local.front(tokens)), targets)))
    return sum(losses) / len(losses)


def run_arm(root: Path, slices: list[bytes], rounds: int, averaged: bool, overlap: bool = False) -> dict[str, Any]:
    """Train ``len(slices)`` trainers for ``rounds`` rounds against one server; their held-out losses."""
    sharding = dataclasses.replace(node_config(root, "probe", []).run.sharding, overlap_averaging=overlap)
    (server,) = start_servers(root, [StageServer], sharding=sharding)
    trainers: list[ShardedTrainer] = []
    started = time.monotonic()
    try:
        for i, data in enumerate(slices):
            (root / f"data{i}.txt").write_bytes(data)
            config = node_config(root, f"trainer{i}", list(server.maddrs), spot_check=0.0, sharding=sharding)
            config.data = str(root / f"data{i}.txt")
            trainers.append(ShardedTrainer(config))
            trainers[-1].prepare()
            trainers[-1].join()
            if not averaged:  # the behaviour before fronts.py (its aggregator stops with the trainer)
                trainers[-1].fronts = None
        steps = rounds * trainers[0].run.train.inner_steps

        def train(trainer: ShardedTrainer) -> None:
            for _ in range(steps):
                trainer.train_step()
            if trainer.fronts is not None:
                trainer.fronts.land(wait=True)  # overlapped: the last round's mean (as run_forever lands it)

        threads = [threading.Thread(target=train, args=(t,)) for t in trainers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=3600)
        seconds = time.monotonic() - started
        held_out = [split_corpus(data, trainers[0].run.model.context)[1] for data in slices]
        own = [held_out_loss(t, server, held_out[i]) for i, t in enumerate(trainers)]
        every = [sum(held_out_loss(t, server, h) for h in held_out) / len(held_out) for t in trainers]
        groups = [t.fronts.stats["averaged"] if t.fronts is not None else 0 for t in trainers]
        rejected = [t.fronts.stats["rejected"] if t.fronts is not None else 0 for t in trainers]  # by the gate
    finally:
        for trainer in trainers:
            trainer.close()
        server.shutdown()
    return {
        "loss_own": round(sum(own) / len(own), 4),
        "loss_all": round(sum(every) / len(every), 4),
        "per_trainer_own": [round(x, 4) for x in own],
        "rounds_averaged": groups,
        "rounds_rejected": rejected,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--trainers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--bytes-per-trainer", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each arm (the means are reported), e.g. 3")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    if args.trainers < 3:
        parser.error("--trainers must be >= 3 (a secure group needs 3)")
    path = Path(args.data)
    if not path.is_file():
        parser.error(f"no data file at {path}; pass --data with a text file")
    logging.basicConfig(level=logging.WARNING)
    text = path.read_bytes()
    size = args.bytes_per_trainer
    if len(text) < size * args.trainers:
        parser.error(f"{path} holds {len(text)} bytes, fewer than --trainers x --bytes-per-trainer")
    slices = [text[i * size : (i + 1) * size] for i in range(args.trainers)]
    result: dict[str, Any] = {"trainers": args.trainers, "rounds": args.rounds, "data": path.name}
    result["repeats"] = args.repeats
    for name, averaged, overlap in (("separate", False, False), ("averaged", True, False), ("overlapped", True, True)):
        runs = []
        for _ in range(args.repeats):  # concurrent trainers step the shared stage in no fixed order: runs differ
            with tempfile.TemporaryDirectory(prefix=f"zen-fronts-{name}-") as folder:
                runs.append(run_arm(Path(folder), slices, args.rounds, averaged, overlap))
        result[name] = {
            **{key: round(sum(r[key] for r in runs) / len(runs), 4) for key in ("loss_own", "loss_all", "seconds")},
            "runs": runs,
        }
    result["loss_all_ratio"] = round(result["averaged"]["loss_all"] / result["separate"]["loss_all"], 4)
    result["overlapped_loss_ratio"] = round(result["overlapped"]["loss_all"] / result["averaged"]["loss_all"], 4)
    result["overlapped_time_ratio"] = round(result["overlapped"]["seconds"] / result["averaged"]["seconds"], 4)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("separate", "averaged", "overlapped"):
            arm = result[name]
            print(f"{name:9s} loss_own {arm['loss_own']:.4f}  loss_all {arm['loss_all']:.4f}  {arm['seconds']} s")
        print(f"averaged / separate (loss_all): {result['loss_all_ratio']}")


if __name__ == "__main__":
    main()
