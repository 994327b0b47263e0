"""How often a node's ledger summary goes to the DHT: at most every 10 receipts or 60 s, at once for the first
and the last round, and when the node stops (node/training/ledger.py).

Real keys, real signatures, a real hivemind DHT peer on 127.0.0.1 that stores what the node publishes; the
rounds are credited through ``ContributionLedger.credit`` as the trainer's ``_finish_round`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from helpers import wait_until

from dht import NodeIdentity
from dht.config import SwarmConfig
from dht.ledger import list_summaries
from node.aggregation.base import AggregationResult
from node.config import NodeConfig, RunConfig
from node.ledger.contributors import read_summaries_cache
from node.runtime import NodeRuntime
from node.training.ledger import PUBLISH_ROUNDS, PUBLISH_SECONDS, ContributionLedger, SummaryPublisher
from node.training.outer import InFlight
from node.training.report import RoundOutcome, RoundReport

RUN = "publishing"
Identities = Callable[[str | None], NodeIdentity]


def _landed(round_no: int, peers: tuple[str, ...], samples: int = 64) -> tuple[RoundReport, InFlight]:
    """A round that landed with a group (as TrainingNode._land sees it)."""
    future: Future = Future()
    future.set_result((RoundOutcome.GROUP, AggregationResult(round_no, len(peers), peers, group_id="ab12")))
    flight = InFlight(round_no, [], [], samples, [], future)
    report = RoundReport(round_no, RoundOutcome.GROUP, 2.0, 2.1, len(peers), samples, 10.0, 4.0, "00", utilization=0.5)
    return report, flight


def _node(tmp_path: Path, maddrs: list[str], me: NodeIdentity, rounds: int) -> tuple[NodeConfig, NodeRuntime]:
    swarm = SwarmConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
    config = NodeConfig(
        run=RunConfig(run_id=RUN),
        swarm=swarm,
        workdir=str(tmp_path / "work"),
        identity=str(tmp_path / "identities" / "me"),
        rounds=rounds,
    )
    config.workdir_path.mkdir(parents=True, exist_ok=True)
    runtime = NodeRuntime(config, me)
    runtime.start()
    return config, runtime


def _settled(publisher: SummaryPublisher | None) -> None:
    assert publisher is not None
    wait_until(publisher.settled, 30, "the ledger publisher to do what the last receipt asked")


def test_defaults_publish_at_most_every_ten_rounds_or_a_minute() -> None:
    """The defaults the docs state: 10 receipts or 60 s, whichever comes first."""
    assert (PUBLISH_ROUNDS, PUBLISH_SECONDS) == (10, 60.0)


def test_a_summary_is_published_every_ten_rounds_and_at_the_last(
    swarm_factory: Callable[..., list], identity_factory: Identities, tmp_path: Path
) -> None:
    """25 quick rounds of a 25-round run: the summary is published (and read back) at rounds 1, 11, 21 and 25,
    not each round; the DHT and the workdir's copy hold the final figures."""
    # Prepare
    peers = swarm_factory(1, run_ids=[RUN])
    me = identity_factory("me")
    config, runtime = _node(tmp_path, peers[0].maddrs, me, rounds=25)
    ledger = ContributionLedger(config)
    group = (me.peer_id, identity_factory(None).peer_id, identity_factory(None).peer_id)
    counts: dict[int, tuple[int, int]] = {}  # round -> (published, read back) once the publisher settled
    try:
        # Execute
        for round_no in range(1, 26):
            assert ledger.credit(runtime, *_landed(round_no, group)) is not None
            _settled(ledger.publisher)
            assert ledger.publisher is not None
            counts[round_no] = (ledger.publisher.published, ledger.publisher.reads)
        held = [e.summary for e in list_summaries(peers[0].dht, RUN) if e.summary is not None]
    finally:
        runtime.close()

    # Assert
    changes = [r for r in range(1, 26) if counts[r] != counts.get(r - 1, (0, 0))]
    assert changes == [1, 11, 21, 25], counts
    assert counts[25] == (4, 4)
    assert [(s.peer_id, s.rounds, s.samples, s.last_round) for s in held] == [(me.peer_id, 25, 25 * 64, 25)]
    assert [(c.peer_id, c.rounds) for c in read_summaries_cache(config.workdir_path, config.run.digest())] == [
        (me.peer_id, 25)
    ]


def test_waiting_receipts_are_published_after_the_interval_and_at_stop(
    swarm_factory: Callable[..., list], identity_factory: Identities, tmp_path: Path
) -> None:
    """A receipt waits at most ``every_seconds``; receipts still waiting when the node stops are published then,
    so the DHT holds the final figures of a run without a last round (``--rounds 0``)."""
    # Prepare
    peers = swarm_factory(1, run_ids=[RUN])
    me = identity_factory("me")
    config, runtime = _node(tmp_path, peers[0].maddrs, me, rounds=0)
    ledger = ContributionLedger(config, every_seconds=1.0)
    group = (me.peer_id, identity_factory(None).peer_id, identity_factory(None).peer_id)

    # Execute
    try:
        ledger.credit(runtime, *_landed(1, group))
        _settled(ledger.publisher)
        ledger.credit(runtime, *_landed(2, group))
        publisher = ledger.publisher
        assert publisher is not None
        waited = publisher.published
        wait_until(lambda: publisher.published == 2 and publisher.settled(), 30, "the interval's publish")
        ledger.every_seconds = publisher.every_seconds = 3600.0  # from here on only the stop publishes
        ledger.credit(runtime, *_landed(3, group))
        _settled(publisher)
        before_stop = publisher.published
    finally:
        runtime.close()
    held = [e.summary for e in list_summaries(peers[0].dht, RUN) if e.summary is not None]

    # Assert
    assert waited == 1 and before_stop == 2 and publisher.published == 3
    assert [(s.rounds, s.last_round) for s in held] == [(3, 3)]
