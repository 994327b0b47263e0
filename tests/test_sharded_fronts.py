"""Sharded trainers average their own parts (node/sharding/fronts.py): real stage server, real secure rounds.

Three in-process trainers on different text train against one real stage server on 127.0.0.1; at the end
of each round they average their embeddings, first block and head through the masked all-reduce. Before,
each trainer's parts stayed its own: three different fronts and heads around one shared middle.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import wait_until
from sharding_harness import node_config, start_servers

from dht import PeerRecord, encode_sketch
from node.config import AggregationConfig, CohortConfig
from node.data import generate_corpus
from node.ledger.receipts import certificate_verdict, read_receipts
from node.model import build_model
from node.sharding.server import StageServer
from node.sharding.stages import LocalParts
from node.sharding.trainer import ShardedTrainer, StepReport

ROUNDS = 2


def join_trainers(
    tmp_path: Path, server: StageServer, texts: list[bytes], trainers: list[ShardedTrainer], **run: Any
) -> None:
    """Prepare and join a trainer of the server's run on each text, appended to ``trainers`` as it starts."""
    for i, text in enumerate(texts):
        (tmp_path / f"data{i}.txt").write_bytes(text)
        config = node_config(tmp_path, f"trainer{i}", list(server.maddrs), spot_check=0.0, **run)
        config.data = str(tmp_path / f"data{i}.txt")
        trainers.append(ShardedTrainer(config))
        trainers[-1].prepare()
        trainers[-1].join()


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
        sent = [[r.bytes_sent for r in rows[steps - 1 :: steps]] for rows in reports]  # read at round ends
        assert all(0 < mine[0] < mine[-1] for mine in sent), sent  # stage calls and averaging: on the wire
        parts = [list(t.local.parameters()) for t in trainers]
        for other in parts[1:]:
            assert all(torch.equal(a, b) for a, b in zip(parts[0], other, strict=True))  # one set of parts
        moved = max(float((a - b).detach().abs().max()) for a, b in zip(parts[0], initial.parameters(), strict=True))
        assert moved > 1e-3  # they trained
        assert all(t.fronts is not None and t.fronts.stats["averaged"] == ROUNDS for t in trainers)
        members = tuple(sorted(t.identity.peer_id for t in trainers))
        for trainer in trainers:  # each round's receipt names the group its parts averaged in, with its certificate
            receipts, failed = read_receipts(trainer.workdir, trainer.run.digest())
            assert failed == 0 and [r.receipt.round for r in receipts] == list(range(1, ROUNDS + 1))
            assert all(r.receipt.contributors == members and r.receipt.outcome == "group" for r in receipts)
            assert len({r.receipt.group_id for r in receipts} - {""}) >= 1
            assert all(certificate_verdict(r.receipt).certified is not None for r in receipts), [
                certificate_verdict(r.receipt).note for r in receipts
            ]
    finally:
        for trainer in trainers:
            trainer.close()
        server.shutdown()


def test_a_sharded_trainer_that_joins_late_takes_the_parts_of_those_ahead_and_averages_with_them(
    tmp_path: Path,
) -> None:
    """Three trainers train a round; a fourth then joins: it takes their parts and anchors (their median: here their
    common bits), continues at their round, and the next round averages all four into one set of parts. Before, it
    started from the seeded parts and its anchor never met theirs (node/sharding/catchup.py). Groups are kept 2
    rounds here (``group_rounds``), so round 2 matches anew and the joiner can enter it."""
    # Prepare
    run = dict(aggregation=AggregationConfig(matchmaking_time=1.0, timeout=6.0, group_rounds=2))
    (server,) = start_servers(tmp_path, [StageServer], **run)
    trainers: list[ShardedTrainer] = []
    try:
        for i in range(4):
            (tmp_path / f"data{i}.txt").write_bytes(generate_corpus(20_000, seed=81 + i))
            config = node_config(tmp_path, f"trainer{i}", list(server.maddrs), spot_check=0.0, **run)
            config.data = str(tmp_path / f"data{i}.txt")
            trainers.append(ShardedTrainer(config))
        for trainer in trainers[:3]:
            trainer.prepare()
            trainer.join()
        steps = trainers[0].run.train.inner_steps

        def train(trainer: ShardedTrainer, count: int) -> None:
            for _ in range(count):
                trainer.train_step()

        first = [threading.Thread(target=train, args=(t, steps)) for t in trainers[:3]]
        for thread in first:
            thread.start()
        for thread in first:
            thread.join(timeout=180)
        assert trainers[0].runtime is not None
        wait_until(
            lambda: sum(p.round >= steps for p in trainers[0].runtime.peers()) >= 3,  # type: ignore[union-attr]
            30,
            "the three trainers' records to show their round",
        )
        ahead = [p.detach().clone() for p in trainers[0].local.parameters()]

        # Execute
        late = trainers[3]
        late.prepare()
        late.join()

        # Assert
        assert late.step == steps  # at their round
        assert all(torch.equal(a, b) for a, b in zip(late.local.parameters(), ahead, strict=True))
        assert late.fronts is not None and trainers[0].fronts is not None
        assert all(torch.equal(a, b) for a, b in zip(late.fronts.anchor, trainers[0].fronts.anchor, strict=True))
        second = [threading.Thread(target=train, args=(t, steps)) for t in trainers]
        for thread in second:
            thread.start()
        for thread in second:
            thread.join(timeout=180)
        assert all(t.step == 2 * steps for t in trainers)
        groups = [
            (t.fronts.last.round, t.fronts.last.group_size) if t.fronts and t.fronts.last else None for t in trainers
        ]
        assert groups == [(2, 4)] * 4, groups
        parts = [list(t.local.parameters()) for t in trainers]
        assert all(torch.equal(a, b) for other in parts[1:] for a, b in zip(parts[0], other, strict=True))
    finally:
        for trainer in trainers:
            trainer.close()
        server.shutdown()


def test_sharded_trainers_in_two_cohorts_share_global_parts_and_keep_cohort_and_local_ones(tmp_path: Path) -> None:
    """Six trainers on two kinds of text, cohorts on (every 2nd round across cohorts): one cohort per kind, the
    global parts (embeddings) identical everywhere after the cross-cohort round, the cohort parts (block 0) one per
    cohort, the local ones (the final norm) each trainer's own."""
    # Prepare
    cohorts = CohortConfig(enabled=True, global_every=2)
    # 24 s rounds: a cohort ready first waits up to 6 two-second slots for the other (span_patience). W = 2 s: at
    # 1 s a fresh-clone CI run (2 cores) saw three of the six miss the cross-cohort group they had declared for
    run = dict(cohorts=cohorts, aggregation=AggregationConfig(matchmaking_time=2.0, timeout=24.0))
    (server,) = start_servers(tmp_path, [StageServer], **run)
    trainers: list[ShardedTrainer] = []
    reports: list[list[StepReport]] = [[] for _ in range(6)]
    try:
        texts = [generate_corpus(20_000, seed=51 + i, style=("prose", "cyrillic")[i % 2]) for i in range(6)]
        join_trainers(tmp_path, server, texts, trainers, **run)
        wait_until(
            lambda: all(sum("trainer" in p.roles for p in t.runtime.peers()) == 6 for t in trainers if t.runtime),
            60,
            "every trainer to list the six trainers",
        )
        for trainer in trainers:  # place each in its cohort from the main thread (it starts the cohort's aggregator)
            assert trainer.fronts is not None
            trainer.fronts.prepare(0)
        steps = 2 * trainers[0].run.train.inner_steps

        def train(i: int) -> None:
            reports[i] += [trainers[i].train_step() for _ in range(steps)]

        # Execute
        threads = [threading.Thread(target=train, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)

        # Assert
        assert all(len(r) == steps for r in reports), [len(r) for r in reports]
        found = [r[-1].cohort for r in reports]
        assert len(set(found)) == 2 and found[0::2] == [found[0]] * 3 and found[1::2] == [found[1]] * 3, found
        assert all(r[-1].group >= 3 for r in reports), [r[-1].group for r in reports]
        assert all(t.fronts is not None and t.fronts.aggregator.crossed for t in trainers)  # type: ignore[attr-defined]
        parts = [dict(t.local.named_parameters()) for t in trainers]

        def same(name: str, members: list[int]) -> bool:
            return all(torch.equal(parts[members[0]][name], parts[j][name]) for j in members[1:])

        for name in ("wte.weight", "wpe.weight"):  # global
            assert same(name, list(range(6))), name
        block = next(name for name in parts[0] if name.startswith("blocks.0."))  # cohort
        assert same(block, [0, 2, 4]) and same(block, [1, 3, 5]) and not same(block, [0, 1])
        assert not same("ln_f.weight", [0, 2])  # local: each trainer's own
    finally:
        for trainer in trainers:
            trainer.close()
        server.shutdown()


def test_a_sharded_trainer_that_moves_cohort_takes_the_new_cohorts_parts(tmp_path: Path) -> None:
    """Seven trainers, three on prose and four on Cyrillic text; after round 1 one Cyrillic trainer's data turns to
    prose: at round 2 it is placed in the prose cohort, takes that cohort's parts (block 0) from its members and
    averages with them: it leaves with their cohort parts bit for bit, and the Cyrillic three with theirs."""
    # Prepare
    cohorts = CohortConfig(enabled=True, global_every=1000)  # cohort rings only
    # W = 2 s: seven trainers' steps on two cores finish up to a second apart under load, and a trainer ready
    # more than W/4 after a slot opened declares in the next one (a full-suite run at W = 1 s lost one so)
    aggregation = AggregationConfig(matchmaking_time=2.0, timeout=12.0, group_rounds=1)
    run = dict(cohorts=cohorts, aggregation=aggregation)
    (server,) = start_servers(tmp_path, [StageServer], **run)
    trainers: list[ShardedTrainer] = []
    reports: list[list[StepReport]] = [[] for _ in range(7)]
    try:
        texts = [
            generate_corpus(20_000, seed=81 + i, style=("prose", "cyrillic")[min(i % 2 + i // 6, 1)]) for i in range(7)
        ]
        join_trainers(tmp_path, server, texts, trainers, **run)
        mover, steps = trainers[6], trainers[0].run.train.inner_steps

        def lists(condition: Callable[[PeerRecord], bool], count: int) -> bool:
            return all(sum(condition(p) for p in t.runtime.peers()) == count for t in trainers if t.runtime)

        def train(i: int) -> None:
            reports[i] += [trainers[i].train_step() for _ in range(steps)]

        def train_round() -> None:
            for trainer in trainers:  # place each from the main thread (it starts its cohort's aggregator)
                assert trainer.fronts is not None
                trainer.fronts.prepare(trainer.round)
            threads = [threading.Thread(target=train, args=(i,)) for i in range(7)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)

        wait_until(lambda: lists(lambda p: "trainer" in p.roles, 7), 60, "every trainer to list the seven trainers")
        train_round()
        first = [r[-1].cohort for r in reports]  # (a cohort's id follows its smallest PeerID, so ids may move too)
        mover.sketch = list(trainers[0].sketch)  # its data is prose now: its record says so at the next heartbeat
        prose = encode_sketch(mover.sketch)
        wait_until(lambda: lists(lambda p: p.sketch == prose, 2), 60, "every trainer to list the mover's new sketch")

        # Execute
        train_round()

        # Assert
        assert all(len(r) == 2 * steps for r in reports), [len(r) for r in reports]
        found = [r[-1].cohort for r in reports]
        assert {first[i] for i in (0, 2, 4)} == {first[0]} and {first[i] for i in (1, 3, 5, 6)} == {first[1]}, first
        assert first[0] != first[1]
        assert {found[i] for i in (0, 2, 4, 6)} == {found[0]}, found
        assert found[1::2] == [found[1]] * 3 and found[1] != found[0], found
        assert [reports[i][-1].group for i in (0, 2, 4, 6)] == [4] * 4
        parts = [dict(t.local.named_parameters()) for t in trainers]
        block = next(name for name in parts[0] if name.startswith("blocks.0."))  # cohort parts
        assert all(torch.equal(parts[0][block], parts[i][block]) for i in (2, 4, 6))
        assert all(torch.equal(parts[1][block], parts[i][block]) for i in (3, 5))
        assert not torch.equal(parts[0][block], parts[1][block])
    finally:
        for trainer in trainers:
            trainer.close()
        server.shutdown()


def test_sharded_trainers_reject_a_poisoned_mean_of_their_parts_and_keep_their_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Four trainers, one of which sends +-clip_bound in every coordinate of its parts' update from round 2 on:
    the honest three average honestly in round 1, then their gate rejects each poisoned mean (mode "rejected";
    the norm check, before any evaluation), their parts stay as they trained them and their held-out loss keeps
    falling."""
    # Prepare
    (server,) = start_servers(tmp_path, [StageServer])
    trainers: list[ShardedTrainer] = []
    reports: list[list[StepReport]] = [[] for _ in range(4)]
    try:
        join_trainers(tmp_path, server, [generate_corpus(20_000, seed=91 + i) for i in range(4)], trainers)
        poisoner, honest, steps = trainers[3], trainers[:3], trainers[0].run.train.inner_steps
        assert poisoner.fronts is not None
        send = poisoner.fronts._updates

        def poisoned(peers: Any) -> Any:
            sent = send(peers)
            if sent is not None and poisoner.round >= 2:  # round 1 honest, then +-B everywhere
                bound = poisoner.run.aggregation.clip_bound
                generator = torch.Generator().manual_seed(poisoner.round)
                for update in sent.updates:
                    update.copy_((torch.randint(0, 2, update.shape, generator=generator) * 2 - 1) * bound)
            return sent

        poisoner.fronts._updates = poisoned  # type: ignore[method-assign]
        wait_until(
            lambda: all(sum("trainer" in p.roles for p in t.runtime.peers()) == 4 for t in trainers if t.runtime),
            60,
            "every trainer to list the four trainers",
        )

        def train(i: int) -> None:
            reports[i] += [trainers[i].train_step() for _ in range(3 * steps)]

        # Execute
        threads = [threading.Thread(target=train, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)

        # Assert
        modes = [[row["mode"] for row in read_rounds(t)] for t in honest]
        assert modes == [["group", "rejected", "rejected"]] * 3, modes
        losses = [[r.eval_loss for r in reports[i] if r.eval_loss is not None] for i in range(3)]
        assert all(mine[2] < mine[0] for mine in losses), losses  # not wrecked: still falling
        assert all(t.fronts is not None and t.fronts.stats["rejected"] == 2 for t in honest)
        assert caplog.text.count("rejected the group's mean of the trainers' parts: its norm") == 6, caplog.text[-2000:]
    finally:
        for trainer in trainers:
            trainer.close()
        server.shutdown()


def read_rounds(trainer: ShardedTrainer) -> list[dict[str, Any]]:
    """The trainer's round lines of ``report.jsonl``."""
    return [json.loads(line) for line in (trainer.workdir / "report.jsonl").read_text().splitlines()]


def test_overlapped_averaging_lands_each_round_while_the_trainers_train_on(tmp_path: Path) -> None:
    """``sharding.overlap_averaging``: each round's averaging runs in the background and its mean lands during the
    next round, keeping the steps trained since; a round's row reports the group that landed during it."""
    # Prepare
    sharding = dataclasses.replace(node_config(tmp_path, "probe", []).run.sharding, overlap_averaging=True)
    (server,) = start_servers(tmp_path, [StageServer], sharding=sharding)
    trainers: list[ShardedTrainer] = []
    reports: list[list[StepReport]] = [[], [], []]
    rounds = 3
    try:
        for i in range(3):
            (tmp_path / f"data{i}.txt").write_bytes(generate_corpus(20_000, seed=71 + i))
            config = node_config(tmp_path, f"trainer{i}", list(server.maddrs), spot_check=0.0, sharding=sharding)
            config.data = str(tmp_path / f"data{i}.txt")
            trainers.append(ShardedTrainer(config))
            trainers[-1].prepare()
            trainers[-1].join()
        steps = trainers[0].run.train.inner_steps

        def train(i: int) -> None:
            reports[i] += [trainers[i].train_step() for _ in range(rounds * steps)]
            assert trainers[i].fronts is not None
            trainers[i].fronts.land(wait=True)  # the last round's mean

        # Execute
        threads = [threading.Thread(target=train, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)

        # Assert
        assert all(len(r) == rounds * steps for r in reports), [len(r) for r in reports]
        assert all([r.group for r in rows[steps - 1 :: steps]] == [0, 3, 3] for rows in reports), reports
        fronts = [t.fronts for t in trainers]
        assert all(f is not None and f.stats["averaged"] == rounds for f in fronts)
        anchors = [f.anchor for f in fronts if f is not None]
        assert all(torch.equal(a, b) for other in anchors[1:] for a, b in zip(anchors[0], other, strict=True))
        parts = [list(t.local.parameters()) for t in trainers]  # no step since the last mean landed: one model
        assert all(torch.equal(a, b) for other in parts[1:] for a, b in zip(parts[0], other, strict=True))
    finally:
        for trainer in trainers:
            trainer.close()
        server.shutdown()
