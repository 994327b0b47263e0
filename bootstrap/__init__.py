"""The bootstrap peer: stable identity, relay, swarm monitor and health endpoint.

class BootstrapConfig, BootstrapPeer (server.py): what to run; the DHT peer, its poller and lifecycle
class SwarmMonitor, SwarmView (monitor.py): diff successive views of the swarm, log joins and leaves
class HealthServer (health.py): ``GET /healthz`` as JSON, on the standard library's http.server
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
