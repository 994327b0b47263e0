"""The bootstrap peer's ``GET /metrics``: Prometheus text built at scrape time from what the peer knows.

A collector on a registry of its own (never the process-wide default, so two peers in one process do
not collide) reads the peer's state when scraped: no gauge is kept up to date between scrapes.

- ``zen_bootstrap_peers_connected``, ``zen_bootstrap_peers_seen``: libp2p peers connected now, ever seen;
- ``zen_bootstrap_runs``, ``zen_bootstrap_run_peers{run,role}``: runs with live records, their peers by role;
- ``zen_bootstrap_records_rejected_total{reason}``: records the DHT process's validator refused, by reason
  (``dht.validator.REJECTION_REASONS``), as of the last poll;
- ``zen_bootstrap_polls_total``, ``zen_bootstrap_dht_requests_total``: looks at the swarm and the DHT calls
  they made;
- ``zen_bootstrap_dht_requests_served_total{kind}``, ``zen_bootstrap_dht_requests_sent_total{kind}``: DHT
  requests (ping, store, find) other peers made to this one, and this one's DHT process made to them, as of
  the last poll (bootstrap/dht_requests.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bootstrap.dht_requests import KINDS

__all__ = ["CONTENT_TYPE_LATEST", "BootstrapMetrics", "MetricsSnapshot"]


@dataclass
class MetricsSnapshot:
    """What one scrape reports."""

    peers_connected: int = 0
    peers_seen: int = 0
    run_peers: dict[str, Counter[str]] = field(default_factory=dict)  # run id -> role -> live records
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> records refused so far
    polls: int = 0
    dht_requests: int = 0
    dht_served: dict[str, int] = field(default_factory=dict)  # kind -> DHT requests served
    dht_sent: dict[str, int] = field(default_factory=dict)  # kind -> DHT requests sent


class BootstrapMetrics:
    """Render ``snapshot()`` in the Prometheus text format.

    Args:
        snapshot: returns the figures to report (called once per scrape, from the HTTP thread).
    """

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, snapshot: Callable[[], MetricsSnapshot]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield GaugeMetricFamily("zen_bootstrap_peers_connected", "libp2p peers connected now", value=s.peers_connected)
        yield GaugeMetricFamily("zen_bootstrap_peers_seen", "distinct libp2p peers seen", value=s.peers_seen)
        live_runs = sum(1 for roles in s.run_peers.values() if roles)
        yield GaugeMetricFamily("zen_bootstrap_runs", "runs with live signed records", value=live_runs)
        peers = GaugeMetricFamily("zen_bootstrap_run_peers", "live records by run and role", labels=["run", "role"])
        for run_id, roles in sorted(s.run_peers.items()):
            for role in ("trainer", "server", "bootstrap"):
                peers.add_metric([run_id, role], roles.get(role, 0))
        yield peers
        rejected = CounterMetricFamily(
            "zen_bootstrap_records_rejected", "records the validator refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(s.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily("zen_bootstrap_polls", "looks at the swarm", value=s.polls)
        yield CounterMetricFamily("zen_bootstrap_dht_requests", "DHT calls made by the poller", value=s.dht_requests)
        for direction, counts, what in (("served", s.dht_served, "served to"), ("sent", s.dht_sent, "sent to")):
            family = CounterMetricFamily(
                f"zen_bootstrap_dht_requests_{direction}", f"DHT requests {what} other peers, by kind", labels=["kind"]
            )
            for kind in (*KINDS, "other"):
                family.add_metric([kind], counts.get(kind, 0))
            yield family
