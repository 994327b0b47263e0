"""The bootstrap peer's HTTP health endpoint, on the standard library only.

``GET /healthz`` answers ``200`` with a JSON object built by a snapshot callable (the peer's
:meth:`~bootstrap.server.BootstrapPeer.health`), or ``503`` while that callable returns ``None``
(the peer is still starting); every other path is ``404``. Only GET and HEAD are served.

The port is bound in the constructor, so a taken port fails there with ``OSError``; port 0
binds any free port and :attr:`HealthServer.url` says which.
The server runs in a daemon thread (``ThreadingHTTPServer``: a slow client never blocks another).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"

Snapshot = Callable[[], dict[str, Any] | None]


class HealthServer:
    """Serve ``GET /healthz`` from a background thread.

    Args:
        host: address to bind, e.g. ``127.0.0.1`` (local only) or ``0.0.0.0`` (all interfaces).
        port: TCP port to bind; 0 picks a free one.
        snapshot: returns the JSON body to serve, or ``None`` while not ready (served as 503).

    Raises:
        OSError: the address cannot be bound (port in use, not an address of this machine).
    """

    def __init__(self, host: str, port: int, snapshot: Snapshot):
        self._httpd = _HealthHTTPServer((host, port), snapshot)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="zen-healthz", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when 0 was asked for)."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """The full health URL, e.g. ``http://127.0.0.1:8080/healthz``."""
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}{HEALTH_PATH}"

    def start(self) -> HealthServer:
        """Start answering requests; return self."""
        self._thread.start()
        logger.info(f"health endpoint: {self.url}")
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (safe to call twice, or before :meth:`start`)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()


class _HealthHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], snapshot: Snapshot):
        self.snapshot = snapshot
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _HealthHandler)


class _HealthHandler(BaseHTTPRequestHandler):
    server: _HealthHTTPServer
    server_version = "zen-bootstrap"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path != HEALTH_PATH:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"not found; try {HEALTH_PATH}"}, send_body)
            return
        try:
            body = self.server.snapshot()
        except Exception as e:  # a broken snapshot must show up as unhealthy, not as a dropped connection
            logger.warning(f"health snapshot failed: {e}")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(e)}, send_body)
            return
        if body is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "starting"}, send_body)
        else:
            self._send(HTTPStatus.OK, body, send_body)

    def _send(self, status: HTTPStatus, body: dict[str, Any], send_body: bool) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server writes every request to stderr; keep access logs out of the operator's view.
        logger.debug(f"{self.address_string()} {format % args}")
