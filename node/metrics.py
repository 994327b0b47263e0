"""A node's Prometheus endpoint (``--metrics-port`` of ``zen-node join`` and ``zen-node serve``).

``NodeMetrics.observe`` takes each :class:`~node.training.report.RoundReport` the trainer hands to its
``on_round`` callback (``observe_step``: a sharded trainer's ``StepReport``) and moves the metrics below;
``watch_*`` add figures read at scrape time from the node itself (its phase clock, its stage client or
server). ``NodeMetrics.serve`` answers ``GET /metrics`` in the Prometheus text format from a daemon thread
(prometheus-client's own server), on a registry of its own so nothing else in the process leaks into it.

A trainer:

- ``zen_node_rounds_total{outcome}``: rounds by how they ended (``RoundOutcome``: group, solo, ...);
- ``zen_node_round_seconds``: wall time per round (a histogram);
- ``zen_node_phase_seconds_total{phase}``: seconds spent in each phase (node/runtime.py ``Phase``: inner,
  aggregation, aggregation_wait, evaluation, checkpoint, download, peer_wait), running phases included;
- ``zen_node_bytes_sent_total``: bytes this node's libp2p daemon sent (the wire meter's total);
- ``zen_node_samples_total``: samples trained on;
- ``zen_node_round``, ``zen_node_eval_loss``, ``zen_node_train_loss``, ``zen_node_utilization``,
  ``zen_node_samples_per_second``, ``zen_node_epsilon`` (only with differential privacy): the last report.

A sharded trainer: ``zen_node_steps_total``, ``zen_node_tokens_total``, ``zen_node_train_loss``, ``zen_node_epsilon``,
``zen_node_tokens_per_second``, the phases, and its stage calls: ``zen_node_stage_calls_total``,
``zen_node_stage_failovers_total`` (calls moved to another server), ``zen_node_stage_busy_total``,
``zen_node_stage_spot_checks_total``, ``zen_node_stage_bans_total``.

A stage server (``zen-node serve``): ``zen_node_stage_calls_served_total{method,outcome}`` (outcome: ok,
busy, averaging, missing, needs_proof, declined, refused, error), ``zen_node_stage_sequences_total``
(sequences its stages computed, forward and backward), ``zen_node_stage_served_per_second``,
``zen_node_stage_replica_misses_total`` (replicas that missed a committed step: skipped for a while),
``zen_node_stages_hosted``.

``--metrics-port`` takes ``PORT`` (on 127.0.0.1) or ``HOST:PORT`` (``0.0.0.0:9100`` for a scraper on
another machine); port 0 picks a free one, which :attr:`NodeMetrics.url` names. ``[node] metrics_port``
in the config file says the same; the flag overrides it.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from node.config import DEFAULT_METRICS_HOST, ConfigError, parse_metrics_address

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from node.runtime import PhaseClock
    from node.sharding.messages import StageReply
    from node.sharding.trainer import StepReport
    from node.training.report import RoundReport

__all__ = [
    "DEFAULT_METRICS_HOST",
    "NodeMetrics",
    "StageCallCounter",
    "call_outcome",
    "parse_metrics_address",
    "start_node_metrics",
]

ROUND_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, math.inf)
CALL_OUTCOMES = ("ok", "busy", "averaging", "missing", "needs_proof", "declined", "refused", "error")
CALL_METHODS = ("forward", "backward", "backward_dp", "commit", "replicate", "state", "weights", "malformed")
SERVED_WINDOW_SECONDS = 30.0  # a server's served rate is measured over about this long
CLIENT_STATS = {  # RemoteStages.stats key -> metric name and help
    "calls": ("zen_node_stage_calls", "stage calls this trainer made"),
    "failovers": ("zen_node_stage_failovers", "stage calls moved to another server (a failure, refusal or stale one)"),
    "busy": ("zen_node_stage_busy", "stage calls refused because the server's GPU was busy"),
    "spot_checks": ("zen_node_stage_spot_checks", "forward outputs recomputed here to check a server"),
}


def call_outcome(reply: StageReply) -> str:
    """A served stage call's outcome (one of CALL_OUTCOMES; node/sharding/messages.py ``StageReply``)."""
    if reply.ok:
        return "ok"
    if reply.reason in ("busy", "averaging"):
        return reply.reason
    return "missing" if reply.missing else "needs_proof" if reply.digest else "declined"


class StageCallCounter:
    """A stage server's calls by method and outcome, the sequences its stages computed, its replicas' misses.

    Thread-safe; :meth:`served_per_second` is the rate the server's record announces.

    Args:
        window: seconds over which the served rate is measured (about; at least the time since the first call).
    """

    def __init__(self, window: float = SERVED_WINDOW_SECONDS):
        self.window = window
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()  # (method, outcome) -> calls
        self.sequences = 0  # sequences computed (a forward or a backward of one sequence through the stage)
        self.replica_misses = 0  # committed steps a replica failed to take
        self._marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)  # (time, sequences)
        self._lock = threading.Lock()

    def call(self, method: str, outcome: str) -> None:
        """Count one call (a method or outcome outside the known ones counts as ``malformed`` / ``declined``)."""
        method = method if method in CALL_METHODS else "malformed"
        outcome = outcome if outcome in CALL_OUTCOMES else "declined"
        with self._lock:
            self.calls[(method, outcome)] += 1

    def computed(self, sequences: int) -> None:
        with self._lock:
            self.sequences += max(0, sequences)

    def replica_missed(self) -> None:
        with self._lock:
            self.replica_misses += 1

    def snapshot(self) -> tuple[dict[tuple[str, str], int], int, int]:
        """(calls by (method, outcome), sequences computed, replica misses), read together."""
        with self._lock:
            return dict(self.calls), self.sequences, self.replica_misses

    def served_per_second(self, now: float | None = None) -> float:
        """Sequences computed per second over the last ``window`` seconds; -1 until a second has passed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._marks.append((now, self.sequences))
            while len(self._marks) > 2 and now - self._marks[1][0] >= self.window:
                self._marks.popleft()  # keep the newest mark that is at least ``window`` old
            since, count = self._marks[0]
            return (self.sequences - count) / (now - since) if now - since >= 1.0 else -1.0


class NodeMetrics:
    """The node's metrics, moved by :meth:`observe`; :meth:`serve` exposes them over HTTP.

    Args:
        role: what the node is: a ``trainer`` reports its rounds, a ``sharded`` trainer its steps and
            tokens, a ``server`` only what its ``watch_*`` collectors read (no round figures stuck at 0).
    """

    def __init__(self, role: Literal["trainer", "sharded", "server"] = "trainer") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry if role == "trainer" else None  # an unregistered metric is kept but never shown
        self.rounds = Counter("zen_node_rounds", "outer rounds by outcome", ["outcome"], registry=r)
        self.round_seconds = Histogram(
            "zen_node_round_seconds", "wall time per outer round", buckets=ROUND_SECONDS_BUCKETS, registry=r
        )
        self.bytes_sent = Counter("zen_node_bytes_sent", "bytes sent by this node's libp2p daemon", registry=r)
        self.samples = Counter("zen_node_samples", "samples trained on", registry=r)
        self.round = Gauge("zen_node_round", "the last outer round reported", registry=r)
        self.eval_loss = Gauge("zen_node_eval_loss", "held-out loss after the last round", registry=r)
        self.utilization = Gauge("zen_node_utilization", "fraction of the last round spent in inner steps", registry=r)
        self.samples_per_second = Gauge("zen_node_samples_per_second", "training throughput last round", registry=r)
        trains = self.registry if role != "server" else None
        self.epsilon = Gauge("zen_node_epsilon", "differential privacy spent so far (-1: no DP)", registry=trains)
        self.epsilon.set(-1)
        self.train_loss = Gauge("zen_node_train_loss", "mean training loss of the last round or step", registry=trains)
        steps = self.registry if role == "sharded" else None
        self.steps = Counter("zen_node_steps", "sharded trainer steps", registry=steps)
        self.tokens = Counter("zen_node_tokens", "tokens a sharded trainer trained on", registry=steps)
        self.tokens_per_second = Gauge("zen_node_tokens_per_second", "a sharded trainer's last step", registry=steps)
        self._bytes_seen = 0  # the wire meter's total at the last report
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe(self, report: RoundReport) -> None:
        """Move the metrics by one round's report (thread-safe)."""
        with self._lock:
            self.rounds.labels(outcome=str(report.mode)).inc()
            if report.mode.trained:
                self.round_seconds.observe(max(0.0, report.seconds))
            self.samples.inc(max(0, report.samples))
            if report.bytes_sent > self._bytes_seen:
                self.bytes_sent.inc(report.bytes_sent - self._bytes_seen)
                self._bytes_seen = report.bytes_sent
            self.round.set(report.round)
            for gauge, value in (
                (self.eval_loss, report.eval_loss),
                (self.train_loss, report.train_loss),
                (self.utilization, report.utilization),
                (self.samples_per_second, report.samples_per_second),
            ):
                if math.isfinite(value):
                    gauge.set(value)
            if report.epsilon is not None:
                self.epsilon.set(report.epsilon)

    def observe_step(self, report: StepReport) -> None:
        """Move the metrics by a sharded trainer's step (thread-safe)."""
        with self._lock:
            self.steps.inc()
            self.tokens.inc(max(0, round(report.tokens_per_second * report.seconds)))
            self.tokens_per_second.set(report.tokens_per_second)
            if math.isfinite(report.loss):
                self.train_loss.set(report.loss)
            if report.epsilon is not None:
                self.epsilon.set(report.epsilon)

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> NodeMetrics:
        """Report what ``collect()`` yields at every scrape (read from the node then, not kept); return self."""
        self.registry.register(_Watch(collect))
        return self

    def watch_phases(self, phases: PhaseClock) -> NodeMetrics:
        """``zen_node_phase_seconds_total{phase}`` from the node's phase clock."""

        def collect() -> Iterable[Metric]:
            family = CounterMetricFamily("zen_node_phase_seconds", "seconds spent in each phase", labels=["phase"])
            for phase, seconds in phases.totals().items():
                family.add_metric([phase], seconds)
            yield family

        return self.watch(collect)

    def watch_stage_client(self, stats: Callable[[], Mapping[str, int]], bans: Callable[[], int]) -> NodeMetrics:
        """A sharded trainer's stage calls, failovers, busy refusals, spot-checks and bans (RemoteStages)."""

        def collect() -> Iterable[Metric]:
            figures = stats()
            for key, (name, text) in CLIENT_STATS.items():
                yield CounterMetricFamily(name, text, value=figures.get(key, 0))
            yield CounterMetricFamily("zen_node_stage_bans", "stage servers this trainer banned", value=bans())

        return self.watch(collect)

    def watch_stage_server(self, counter: StageCallCounter, hosted: Callable[[], int]) -> NodeMetrics:
        """A stage server's calls served by method and outcome, sequences computed, replica misses."""

        def collect() -> Iterable[Metric]:
            calls, sequences, misses = counter.snapshot()
            family = CounterMetricFamily(
                "zen_node_stage_calls_served", "stage calls served, by method and outcome", labels=["method", "outcome"]
            )
            for (method, outcome), count in sorted(calls.items()):
                family.add_metric([method, outcome], count)
            yield family
            yield CounterMetricFamily("zen_node_stage_sequences", "sequences the stages computed", value=sequences)
            yield CounterMetricFamily(
                "zen_node_stage_replica_misses", "committed steps a replica failed to take", value=misses
            )
            yield GaugeMetricFamily(
                "zen_node_stage_served_per_second",
                "sequences computed per second lately (-1: not yet measured)",
                value=counter.served_per_second(),
            )
            yield GaugeMetricFamily("zen_node_stages_hosted", "stages hosted now", value=hosted())

        return self.watch(collect)

    def serve(self, host: str, port: int) -> NodeMetrics:
        """Answer ``GET /metrics`` on ``host:port`` from a daemon thread; return self.

        Raises:
            OSError: the address cannot be bound (port in use, not an address of this machine).
        """
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self

    @property
    def url(self) -> str:
        """E.g. ``http://127.0.0.1:9100/metrics``; empty before :meth:`serve`."""
        if self._server is None:
            return ""
        address = self._server.server_address
        host, port = str(address[0]), int(address[1])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Watch:
    """A collector that yields what a function reads from the node at scrape time."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]):
        self._collect = collect

    def describe(self) -> list[Metric]:
        return []  # names are not checked against the registry's: each watch owns its own

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def start_node_metrics(
    address: str | None, role: Literal["trainer", "sharded", "server"] = "trainer"
) -> NodeMetrics | None:
    """``--metrics-port``'s endpoint for a node of ``role``, serving; None without the flag.

    Raises:
        ConfigError: the address is malformed or cannot be bound.
    """
    if address is None:
        return None
    try:
        host, port = parse_metrics_address(address)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        return NodeMetrics(role).serve(host, port)
    except OSError as e:
        raise ConfigError(f"--metrics-port {address}: cannot serve on {host}:{port}: {e.strerror or e}") from None
