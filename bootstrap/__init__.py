"""The bootstrap peer: stable identity, relay, swarm monitor and health endpoint.

class BootstrapConfig, BootstrapPeer (server.py): what to run; the DHT peer, its poller and lifecycle
class SwarmMonitor, SwarmView (monitor.py): diff successive views of the swarm, log joins and leaves
class HealthServer (health.py): ``GET /healthz`` as JSON and the other routes, on the standard library's http.server
class SwarmBoard (swarm_api.py): verified records and each trainer's round history; the ``/api/swarm`` body
dashboard_routes (dashboard.py): ``GET /`` (dashboard.html), ``/api/swarm``, ``/metrics``
class BootstrapMetrics (metrics.py): the Prometheus text of ``/metrics``
stored_runs, rejections (discovery.py): runs found in the DHT process's storage, the validator's refusals
class DHTRequestCounter (dht_requests.py): counts the DHT requests the peer serves and sends, by kind
main (cli.py): the ``zen-bootstrap`` command

``bootstrap`` imports ``dht`` (and hivemind, the standard library), never ``node``.
"""

from bootstrap.health import HealthServer
from bootstrap.monitor import SwarmMonitor, SwarmView
from bootstrap.server import BootstrapConfig, BootstrapError, BootstrapPeer

__all__ = [
    "BootstrapConfig",
    "BootstrapError",
    "BootstrapPeer",
    "HealthServer",
    "SwarmMonitor",
    "SwarmView",
]
