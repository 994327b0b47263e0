"""A trainer's Prometheus endpoint (``zen-node join --metrics-port``), fed by the round reports.

``NodeMetrics.observe`` takes each :class:`~node.training.report.RoundReport` the trainer hands to its
``on_round`` callback and moves the metrics below; ``NodeMetrics.serve`` answers ``GET /metrics`` in
the Prometheus text format from a daemon thread (prometheus-client's own server), on a registry of its
own so nothing else in the process leaks into it.

- ``zen_node_rounds_total{outcome}``: rounds by how they ended (``RoundOutcome``: group, solo, ...);
- ``zen_node_round_seconds``: wall time per round (a histogram);
- ``zen_node_bytes_sent_total``: bytes this node's libp2p daemon sent (the wire meter's total);
- ``zen_node_samples_total``: samples trained on;
- ``zen_node_round``, ``zen_node_eval_loss``, ``zen_node_train_loss``, ``zen_node_utilization``,
  ``zen_node_samples_per_second``, ``zen_node_epsilon`` (only with differential privacy): the last report.

``--metrics-port`` takes ``PORT`` (on 127.0.0.1) or ``HOST:PORT`` (``0.0.0.0:9100`` for a scraper on
another machine); port 0 picks a free one, which :attr:`NodeMetrics.url` names.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from node.training.report import RoundReport

DEFAULT_METRICS_HOST = "127.0.0.1"
ROUND_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, math.inf)


def parse_metrics_address(value: str) -> tuple[str, int]:
    """``"9100"`` -> ``("127.0.0.1", 9100)``; ``"0.0.0.0:9100"`` -> ``("0.0.0.0", 9100)``.

    Raises:
        ValueError: not a port in 0..65535, optionally after a host and a colon.
    """
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or DEFAULT_METRICS_HOST
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-port must be PORT or HOST:PORT with a port in 0..65535, got {value!r}")
    return host, int(port)


class NodeMetrics:
    """The node's metrics, moved by :meth:`observe`; :meth:`serve` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds = Counter("zen_node_rounds", "outer rounds by outcome", ["outcome"], registry=r)
        self.round_seconds = Histogram(
            "zen_node_round_seconds", "wall time per outer round", buckets=ROUND_SECONDS_BUCKETS, registry=r
        )
        self.bytes_sent = Counter("zen_node_bytes_sent", "bytes sent by this node's libp2p daemon", registry=r)
        self.samples = Counter("zen_node_samples", "samples trained on", registry=r)
        self.round = Gauge("zen_node_round", "the last outer round reported", registry=r)
        self.eval_loss = Gauge("zen_node_eval_loss", "held-out loss after the last round", registry=r)
        self.train_loss = Gauge("zen_node_train_loss", "mean training loss of the last round's inner steps", registry=r)
        self.utilization = Gauge("zen_node_utilization", "fraction of the last round spent in inner steps", registry=r)
        self.samples_per_second = Gauge("zen_node_samples_per_second", "training throughput last round", registry=r)
        self.epsilon = Gauge("zen_node_epsilon", "differential privacy spent so far (-1: no DP)", registry=r)
        self.epsilon.set(-1)
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


def start_node_metrics(address: str | None) -> NodeMetrics | None:
    """``--metrics-port``'s endpoint, serving; None without the flag.

    Raises:
        ConfigError: the address is malformed or cannot be bound.
    """
    if address is None:
        return None
    from node.config import ConfigError  # the CLI's one-line user error

    try:
        host, port = parse_metrics_address(address)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        return NodeMetrics().serve(host, port)
    except OSError as e:
        raise ConfigError(f"--metrics-port {address}: cannot serve on {host}:{port}: {e.strerror or e}") from None
