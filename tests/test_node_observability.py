"""What a node says about itself while it works: seconds per phase, stage calls, the live line, its records.

The phase clock is driven by a clock of the test's own (no sleeps, no wall-clock assertions); metrics are
scraped over HTTP and parsed with ``prometheus_client.parser``; the live line is read from a pseudo-terminal;
the round history a record carries and a sharded trainer with its stage server run on real DHT peers and
real libp2p on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pty
import select
import struct
import termios
import threading
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import LOCALHOST_MADDR, wait_until
from prometheus_client.parser import text_string_to_metric_families
from sharding_harness import node_config, start_servers

from dht import SKETCH_DIM, Capacity, NodeIdentity, PeerRecord, SwarmConfig, encode_sketch
from dht.records import MAX_RECENT_ROUNDS, RECORD_TAG, RecordError
from node.cli import build_parser, config_from_args
from node.config import ConfigError, NodeConfig, RunConfig, load_node_config
from node.data import generate_corpus
from node.metrics import NodeMetrics, StageCallCounter
from node.progress import RoundProgress
from node.runtime import NodeRuntime, PhaseClock
from node.sharding.server import StageServer
from node.sharding.trainer import EVAL_BATCHES, ShardedTrainer, StepReport
from node.training.report import RoundOutcome, RoundReport

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FakeTime:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 100.0):
        self.value = start

    def __call__(self) -> float:
        return self.value


def _scrape(metrics: NodeMetrics) -> Samples:
    with urllib.request.urlopen(metrics.url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _phase(samples: Samples, phase: str) -> float:
    return samples[("zen_node_phase_seconds_total", (("phase", phase),))]


# --- the phase clock -----------------------------------------------------------------------------------------


def test_a_nested_phase_pauses_its_threads_phase_and_other_threads_run_beside() -> None:
    """Landing between inner steps is not inner time; an aggregation on another thread counts beside them."""
    # Prepare
    now = FakeTime()
    clock = PhaseClock(now)
    entered, release = threading.Event(), threading.Event()

    def aggregate() -> None:
        with clock.phase("aggregation", "aggregating round 1"):
            entered.set()
            release.wait(30)

    worker = threading.Thread(target=aggregate)

    # Execute
    with clock.phase("inner", "round 2", steps=10, tokens_per_step=64):
        worker.start()
        entered.wait(30)
        now.value += 3  # inner and the aggregation both run
        with clock.phase("aggregation_wait", "landing round 1"):
            now.value += 2  # inner is paused
            running = [a.phase for a in clock.running()]
        release.set()
        worker.join(30)
        clock.stepped(6)
        now.value += 1
        live = clock.totals()
        progress = clock.inner_progress()
    done = clock.totals()

    # Assert
    assert running == ["inner", "aggregation", "aggregation_wait"]
    assert (live["inner"], live["aggregation_wait"], live["aggregation"]) == (4.0, 2.0, 5.0)
    assert done == {**done, "inner": 4.0, "aggregation": 5.0, "aggregation_wait": 2.0, "download": 0.0}
    assert progress is not None and (progress.steps, progress.total) == (6, 10)
    assert progress.tokens_per_second == pytest.approx(6 * 64 / 4.0)
    assert clock.running() == []


def test_lap_gives_each_reports_seconds_and_its_share_in_inner_steps() -> None:
    """A round report's seconds and utilization come from the clock's laps."""
    # Prepare
    now = FakeTime()
    clock = PhaseClock(now)

    # Execute
    with clock.phase("inner"):
        now.value += 3
    with clock.phase("evaluation"):
        now.value += 1
    first = clock.lap()
    now.value += 2
    second = clock.lap()

    # Assert
    assert first == (4.0, 0.75) and second == (2.0, 0.0)


def test_summary_names_where_the_time_went() -> None:
    """The line a join prints at its end: each phase that took time, its share of the wall, then the rest."""
    # Prepare
    now = FakeTime()
    clock = PhaseClock(now)

    def aggregate() -> None:  # the aggregation thread: counted, but not taken off the node's own idle time
        with clock.phase("aggregation"):
            now.value += 2

    # Execute
    with clock.phase("inner"):
        now.value += 6
    with clock.phase("aggregation_wait"):
        now.value += 1
        worker = threading.Thread(target=aggregate)
        worker.start()
        worker.join(30)
    now.value += 1  # reports, the DHT: no phase

    # Assert
    assert clock.summary() == (
        "inner 6.0 s (60%), aggregation 2.0 s (20%), aggregation_wait 3.0 s (30%), other 1.0 s (10%)"
    )


# --- metrics -----------------------------------------------------------------------------------------------


def test_node_metrics_report_the_seconds_per_phase_as_they_run() -> None:
    """``zen_node_phase_seconds_total{phase}`` includes a phase still running, and never goes back."""
    # Prepare
    now = FakeTime()
    clock = PhaseClock(now)
    metrics = NodeMetrics().watch_phases(clock).serve("127.0.0.1", 0)
    try:
        # Execute
        with clock.phase("download", "downloading the swarm's state"):
            now.value += 5
            during = _scrape(metrics)
            now.value += 1
        with clock.phase("inner"):
            now.value += 2
        after = _scrape(metrics)
    finally:
        metrics.stop()

    # Assert
    assert _phase(during, "download") == 5.0 and _phase(after, "download") == 6.0
    assert _phase(after, "inner") == 2.0 and _phase(after, "peer_wait") == 0.0


def test_stage_call_counter_bounds_its_labels_and_measures_what_was_served() -> None:
    """Calls count by a known method and outcome (others fold into malformed/declined); the served rate is
    sequences per second since the oldest mark within the window, -1 before a second has passed."""
    # Prepare
    counter = StageCallCounter(window=10.0)
    metrics = NodeMetrics("server").watch_stage_server(counter, lambda: 2).serve("127.0.0.1", 0)

    # Execute
    first = counter.served_per_second(now=0.0)
    counter.computed(40)
    early = counter.served_per_second(now=0.5)
    counter.computed(60)
    rate = counter.served_per_second(now=5.0)
    later = counter.served_per_second(now=25.0)  # marks older than the window are dropped: 0 since 5 s
    for method, outcome in [("forward", "ok"), ("forward", "ok"), ("commit", "needs_proof"), ("x" * 99, "y")]:
        counter.call(method, outcome)
    counter.replica_missed()
    try:
        samples = _scrape(metrics)
    finally:
        metrics.stop()

    # Assert
    assert (first, early, rate) == (-1.0, -1.0, 100 / 5.0) and later == 0.0
    calls = {labels: v for (name, labels), v in samples.items() if name == "zen_node_stage_calls_served_total"}
    assert calls == {
        (("method", "forward"), ("outcome", "ok")): 2,
        (("method", "commit"), ("outcome", "needs_proof")): 1,
        (("method", "malformed"), ("outcome", "declined")): 1,
    }
    assert samples[("zen_node_stage_sequences_total", ())] == 100
    assert samples[("zen_node_stage_replica_misses_total", ())] == 1
    assert samples[("zen_node_stages_hosted", ())] == 2
    assert not any(name.startswith(("zen_node_round", "zen_node_samples", "zen_node_steps")) for name, _ in samples)


def test_a_sharded_trainer_and_its_stage_server_feed_their_metrics(tmp_path: Path) -> None:
    """A real ShardedTrainer's steps move its steps, tokens, phases and stage calls; its server counts the
    calls it served and the sequences computed, and its signed record announces a served rate."""
    # Prepare
    (server,) = start_servers(tmp_path, [StageServer])
    server_metrics = NodeMetrics("server").watch_stage_server(server.calls, lambda: len(server.hosted))
    server_metrics.serve("127.0.0.1", 0)
    trainer_metrics = NodeMetrics("sharded")
    config = node_config(tmp_path, "trainer", list(server.maddrs), spot_check=0.0)
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=5))
    config.data, config.rounds = str(tmp_path / "data.txt"), 1  # one round: train.inner_steps steps
    trainer = ShardedTrainer(config, on_step=trainer_metrics.observe_step)
    trainer_metrics.watch_phases(trainer.phases)
    trainer_metrics.watch_stage_client(lambda: trainer.remote.stats if trainer.remote else {}, lambda: 0)
    trainer_metrics.serve("127.0.0.1", 0)
    try:
        # Execute
        trainer.prepare()
        trainer.join()
        trainer.run_forever()
        mine, served = _scrape(trainer_metrics), _scrape(server_metrics)
        assert trainer.runtime is not None
        peers = trainer.runtime.peers

        def announced() -> PeerRecord | None:  # the served rate, once a heartbeat after a second of serving
            record = next((r for r in peers() if r.peer_id == server.identity.peer_id), None)
            return record if record is not None and record.served_per_second > 0 else None

        record = wait_until(announced, 30, "the server's record to announce a served rate")
    finally:
        trainer.close()
        server.shutdown()
        trainer_metrics.stop()
        server_metrics.stop()

    # Assert
    steps, batch, context = config.run.train.inner_steps, config.run.train.batch_size, config.run.model.context
    assert mine[("zen_node_steps_total", ())] == steps
    assert mine[("zen_node_tokens_total", ())] == steps * batch * context
    assert _phase(mine, "inner") > 0 and ("zen_node_phase_seconds_total", (("phase", "peer_wait"),)) in mine
    assert mine[("zen_node_stage_calls_total", ())] >= 3 * steps  # forward, backward, commit per step
    assert mine[("zen_node_stage_failovers_total", ())] == 0
    assert not any(name.startswith("zen_node_round") for name, _ in mine)  # a sharded trainer counts steps
    for method in ("forward", "backward", "commit"):
        assert served[("zen_node_stage_calls_served_total", (("method", method), ("outcome", "ok")))] >= steps
    # a forward and a backward a step, and the round's held-out evaluation: a forward a batch
    assert served[("zen_node_stage_sequences_total", ())] == 2 * steps * batch + EVAL_BATCHES * batch
    assert record.stages == (0,) and record.served_per_second > 0


# --- the live line -----------------------------------------------------------------------------------------


def _report(round_no: int) -> RoundReport:
    return RoundReport(
        round=round_no, mode=RoundOutcome.GROUP, eval_loss=2.0, train_loss=2.2, group_size=3, samples=64,
        samples_per_second=128.0, seconds=0.5, state_digest="00" * 16, utilization=0.75, bytes_sent=1000,
        inner_steps=8,
    )  # fmt: skip


def test_the_status_line_shows_the_inner_step_tokens_per_second_and_what_a_wait_waits_for() -> None:
    """Before the first round only the wait shows; then the round, inner step, tokens/s, and a running wait."""
    # Prepare
    now = FakeTime()
    clock = PhaseClock(now)
    progress = RoundProgress(lambda r: None, 10, tty=False, phases=clock)

    # Execute
    idle = progress.status_line()
    with clock.phase("download", "downloading the swarm's state"):
        now.value += 14
        downloading = progress.status_line()
    progress(_report(3))
    with clock.phase("inner", "round 4", steps=30, tokens_per_step=256):
        now.value += 2
        clock.stepped(12)
        training = progress.status_line()
        with clock.phase("aggregation_wait", "waiting for round 3's group"):
            now.value += 6
            waiting = progress.status_line()

    # Assert
    assert idle == "" and downloading == "downloading the swarm's state (14 s)"
    assert "round 3/10 | inner step 12/30 | 1536 tokens/s | eval loss 2.0000" in training
    assert " s into round 4" in training
    assert waiting.endswith("busy 75% | waiting for round 3's group (6 s)")


def test_a_sharded_trainers_status_line_counts_steps_and_rounds() -> None:
    """A step report shows the step of the run's total, its round, loss, tokens/s, failovers and bans."""
    # Prepare
    progress = RoundProgress(lambda r: None, 2, tty=False, steps_per_round=5)
    report = StepReport(
        step=7, loss=2.5, versions=[7], servers=["abc"], seconds=0.5, tokens_per_second=256.0, failovers=1, bans=0
    )

    # Execute
    progress(report)

    # Assert
    assert progress.status_line() == (
        "[##############......] step 7/10 | round 1/2 | loss 2.5000 | 256 tokens/s | failovers 1 | bans 0"
    )


def _drain_until(fd: int, text: str, quiet_periods: int = 60) -> str:
    """What ``fd`` delivers until ``text`` shows up in it (or ``quiet_periods`` half-second waits pass)."""
    seen = b""
    for _ in range(quiet_periods):
        if text.encode() in seen:
            break
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 65536)
    return seen.decode(errors="replace")


def test_on_a_terminal_the_wait_before_the_first_round_is_drawn_and_a_pipe_gets_nothing(tmp_path: Path) -> None:
    """Under a pseudo-terminal the ticker draws what the node waits for before any report; a file stays empty."""
    # Prepare
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    terminal = os.fdopen(slave, "w")
    piped = open(tmp_path / "out.txt", "w")
    clock = PhaseClock()
    live = RoundProgress(lambda r: None, 10, stream=terminal, phases=clock).start()
    plain = RoundProgress(lambda r: None, 10, stream=piped, phases=clock).start()

    # Execute
    with clock.phase("peer_wait", "waiting for peers: 1/3 trainers listed"):
        shown = _drain_until(master, "waiting for peers: 1/3 trainers listed (")
        live.write_line("joined run 'r'")
        # the terminal turns \n into \r\n; the line and its redraw may come in separate reads: wait for both
        after = _drain_until(master, "joined run 'r'\r\nwaiting for peers")
    live.close()
    plain.close()
    piped.close()
    terminal.close()
    os.close(master)

    # Assert
    assert shown.startswith("waiting for peers: 1/3 trainers listed (")  # the first thing on the terminal
    assert after.startswith("\r\x1b[2Kjoined run 'r'\r\nwaiting for peers")  # erased, printed, drawn again
    assert (tmp_path / "out.txt").read_text() == ""


# --- configuration -----------------------------------------------------------------------------------------


def test_metrics_port_comes_from_the_config_file_and_the_flag_overrides_it(tmp_path: Path) -> None:
    """``[node] metrics_port`` (a number or "HOST:PORT") is read; ``--metrics-port`` wins; a bad value is named."""
    # Prepare
    (tmp_path / "node.toml").write_text("[node]\nmetrics_port = 9100\n")
    (tmp_path / "bad.toml").write_text('[node]\nmetrics_port = "host:99999"\n')
    parser = build_parser()

    # Execute
    from_file = load_node_config(str(tmp_path / "node.toml")).metrics_port
    join = config_from_args(parser.parse_args(["join", "--config", str(tmp_path / "node.toml")]))
    flag = config_from_args(
        parser.parse_args(["join", "--config", str(tmp_path / "node.toml"), "--metrics-port", "0.0.0.0:0"])
    )
    serve = config_from_args(parser.parse_args(["serve", "--metrics-port", "9200"]))
    with pytest.raises(ConfigError, match=r"node\.metrics_port"):
        load_node_config(str(tmp_path / "bad.toml"))

    # Assert
    assert (from_file, join.metrics_port, flag.metrics_port) == ("9100", "9100", "0.0.0.0:0")
    assert serve.metrics_port == "9200"
    assert NodeConfig().metrics_port is None


# --- the records' optional fields ------------------------------------------------------------------------------


def _record(identity: NodeIdentity, **fields: Any) -> PeerRecord:
    values: dict[str, Any] = dict(
        peer_id=identity.peer_id, signing_key=identity.signing_public_key, binding=identity.binding,
        x25519_key=identity.x25519_public_key, version="0.1.0", run_hash="ab" * 16, capacity=Capacity(),
        sketch=encode_sketch([0.0] * SKETCH_DIM), roles=("trainer",), round=20, state_digest=b"", timestamp=1.0,
    )  # fmt: skip
    values.update(fields)
    return PeerRecord(**values)


def test_recent_rounds_and_served_rate_verify_back_and_stay_off_the_wire_at_their_defaults(tmp_path: Path) -> None:
    """The new fields round-trip through a signed record; a record without them signs as older nodes' did."""
    # Prepare
    me = NodeIdentity.load_or_create(tmp_path / "me")
    recent = tuple((r, 2.0, 100 * r) for r in range(5, 5 + MAX_RECENT_ROUNDS))

    # Execute
    trainer = PeerRecord.verify(_record(me, recent_rounds=recent).sign(me))
    server = PeerRecord.verify(_record(me, roles=("server",), stages=(1,), served_per_second=12.5).sign(me))
    _, body, _ = msgpack.unpackb(_record(me).sign(me), raw=False)

    # Assert
    assert trainer.recent_rounds == recent and server.served_per_second == 12.5
    assert not {"recent_rounds", "served_per_second"} & set(msgpack.unpackb(body, raw=False))


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"recent_rounds": tuple((r, 1.0, 0) for r in range(MAX_RECENT_ROUNDS + 1))}, id="too-many"),
        pytest.param({"recent_rounds": ((3, 1.0, 0), (3, 1.0, 0))}, id="repeated-round"),
        pytest.param({"recent_rounds": ((21, 1.0, 0),)}, id="past-the-record's-round"),
        pytest.param({"recent_rounds": ((3, float("nan"), 0),)}, id="nan-loss"),
        pytest.param({"recent_rounds": ((3, 1.0, -5),)}, id="negative-bytes"),
        pytest.param({"served_per_second": 5.0}, id="served-by-a-trainer"),
        pytest.param({"roles": ("server",), "served_per_second": float("inf")}, id="infinite-rate"),
        pytest.param({"roles": ("server",), "served_per_second": 1e10}, id="huge-rate"),
    ],
)
def test_out_of_range_recent_rounds_and_served_rates_are_refused(tmp_path: Path, fields: dict[str, Any]) -> None:
    """Both fields are bounded: signing refuses a bad value, and so does verifying a record signed anyway."""
    # Prepare
    me = NodeIdentity.load_or_create(tmp_path / "me")
    record = _record(me, **fields)
    body = msgpack.packb(
        {k: [list(v) for v in val] if k == "recent_rounds" else val for k, val in _wire(record).items()},
        use_bin_type=True,
    )
    envelope = msgpack.packb([RECORD_TAG, body, me.sign(RECORD_TAG.encode() + body)], use_bin_type=True)

    # Execute / Assert
    with pytest.raises(RecordError):
        record.sign(me)
    with pytest.raises(RecordError):
        PeerRecord.verify(envelope)


def test_a_malformed_recent_rounds_entry_is_refused(tmp_path: Path) -> None:
    """An entry that is not [int, number, int] is refused before any range check."""
    # Prepare
    me = NodeIdentity.load_or_create(tmp_path / "me")
    wire = _wire(_record(me))
    wire["recent_rounds"] = [[3, "2.0", 0]]
    body = msgpack.packb(wire, use_bin_type=True)

    # Execute / Assert
    with pytest.raises(RecordError, match="recent_rounds"):
        PeerRecord.verify(msgpack.packb([RECORD_TAG, body, me.sign(RECORD_TAG.encode() + body)], use_bin_type=True))


def _wire(record: PeerRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def test_a_runtimes_records_carry_its_last_rounds(tmp_path: Path) -> None:
    """Rounds noted faster than anyone reads reach the DHT: the record carries the last MAX_RECENT_ROUNDS,
    rounds increasing (a later note for an earlier round replaces the ones after it)."""
    # Prepare
    swarm = SwarmConfig(host_maddrs=[LOCALHOST_MADDR])
    config = NodeConfig(run=RunConfig(run_id="carry"), swarm=swarm, identity=str(tmp_path / "id"))
    runtime = NodeRuntime.create(config)
    describe = dict(capacity=Capacity(), sketch=encode_sketch([0.0] * SKETCH_DIM), roles=("trainer",))
    state = {"round": 0}
    try:
        runtime.start()
        runtime.announce(lambda: {**describe, "round": state["round"], "state_digest": b""})

        # Execute
        for round_no in range(1, 31):
            state["round"] = round_no
            runtime.note_round(3.0 - 0.05 * round_no, 1000 * round_no, round_no)
        runtime.note_round(1.0, 31_000, 29)  # a resync back to round 29
        state["round"] = 29
        wait_until(runtime.beat, 30, "the record stored")
        (record,) = runtime.peers()
    finally:
        runtime.close()

    # Assert
    rounds = [r for r, _, _ in record.recent_rounds]
    assert rounds == list(range(31 - MAX_RECENT_ROUNDS, 30))  # the last 16 (15-30), then 29 and 30 replaced
    assert record.recent_rounds[-1] == (29, 1.0, 1000) and record.recent_rounds[0][2] == 1000
    assert (record.eval_loss, record.round_bytes) == (1.0, 1000)
