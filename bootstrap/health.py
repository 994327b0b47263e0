"""The bootstrap peer's HTTP health endpoint, on the standard library only.

``GET /healthz`` answers ``200`` with a JSON object built by a snapshot callable (the peer's
:meth:`~bootstrap.server.BootstrapPeer.health`), or ``503`` while that callable returns ``None``
(the peer is still starting). Other paths are served by the routes the caller hands in (the
dashboard, ``/api/swarm``, ``/metrics``: see server.py), each called with the query string's
parameters (at most ``MAX_QUERY_FIELDS``, each at most ``MAX_QUERY_VALUE`` characters, else ``400``);
every other path is ``404``. Only GET and HEAD are served.

The port is bound in the constructor, so a taken port fails there with ``OSError``; port 0
binds any free port and :attr:`HealthServer.url` says which.
The server runs in a daemon thread (``ThreadingHTTPServer``: a slow client never blocks another).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

logger = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
MAX_QUERY_FIELDS = 8  # query parameters a request may carry
MAX_QUERY_VALUE = 256  # characters of one query parameter

_PAGE_POLICY = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"

Snapshot = Callable[[], dict[str, Any] | None]
Response = tuple[HTTPStatus, str, bytes]  # status, content type, body
Route = Callable[[dict[str, str]], Response]  # called with the query's parameters


class BadRequest(ValueError):
    """A route's answer to a malformed request: served as 400 with this message."""


class HealthServer:
    """Serve ``GET /healthz`` from a background thread.

    Args:
        host: address to bind, e.g. ``127.0.0.1`` (local only) or ``0.0.0.0`` (all interfaces).
        port: TCP port to bind; 0 picks a free one.
        snapshot: returns the JSON body to serve, or ``None`` while not ready (served as 503).
        routes: other paths to serve, e.g. ``{"/metrics": ...}``.

    Raises:
        OSError: the address cannot be bound (port in use, not an address of this machine).
    """

    def __init__(self, host: str, port: int, snapshot: Snapshot, routes: Mapping[str, Route] | None = None):
        self._httpd = _HealthHTTPServer((host, port), snapshot, dict(routes or {}))
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

    def __init__(self, address: tuple[str, int], snapshot: Snapshot, routes: dict[str, Route]):
        self.snapshot = snapshot
        self.routes = routes
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
        path, _, query = self.path.partition("?")
        if path in self.server.routes:
            self._route(self.server.routes[path], query, send_body)
            return
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

    def _route(self, route: Route, query: str, send_body: bool) -> None:
        try:
            try:
                fields = parse_qsl(query, max_num_fields=MAX_QUERY_FIELDS)
            except ValueError:
                raise BadRequest(f"more than {MAX_QUERY_FIELDS} query parameters") from None
            if any(len(value) > MAX_QUERY_VALUE for _, value in fields):
                raise BadRequest(f"a query parameter is over {MAX_QUERY_VALUE} characters")
            status, content_type, data = route(dict(fields))
        except BadRequest as e:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(e)[:300]}, send_body)
            return
        except Exception as e:  # a broken route must answer 500, not drop the connection
            logger.warning(f"{self.path[:100]!r} failed: {type(e).__name__}: {e}")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": type(e).__name__}, send_body)
            return
        self._send_bytes(status, content_type, data, send_body)

    def _send(self, status: HTTPStatus, body: dict[str, Any], send_body: bool) -> None:
        self._send_bytes(status, "application/json", json.dumps(body).encode(), send_body)

    def _send_bytes(self, status: HTTPStatus, content_type: str, data: bytes, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if content_type.startswith("text/html"):
            # The page is self-contained: no script, style or request may leave for another origin.
            self.send_header("Content-Security-Policy", _PAGE_POLICY)
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server writes every request to stderr; keep access logs out of the operator's view.
        logger.debug(f"{self.address_string()} {format % args}")
