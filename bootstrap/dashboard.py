"""The bootstrap's HTTP routes beyond ``/healthz``: the dashboard page, ``/api/swarm`` and ``/metrics``.

- ``GET /`` serves ``dashboard.html`` (next to this module): one self-contained page, inline script and
  style, no external asset, that polls ``/api/swarm`` and draws the peers, cohorts and round charts. It
  writes record data into the page only through ``textContent`` and SVG attributes, never as markup.
- ``GET /api/swarm[?run=<run id>]``: :meth:`bootstrap.swarm_api.SwarmBoard.document` as JSON. Without
  ``run``, the first ``--run-id`` (or the only run known); an unknown run is a 404, a malformed one a 400.
- ``GET /metrics``: the Prometheus text of :class:`bootstrap.metrics.BootstrapMetrics`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from http import HTTPStatus
from importlib import resources

from bootstrap.health import BadRequest, Response, Route
from bootstrap.metrics import CONTENT_TYPE_LATEST, BootstrapMetrics
from bootstrap.swarm_api import SwarmBoard

PAGE_FILE = "dashboard.html"


def dashboard_routes(
    board: SwarmBoard, metrics: BootstrapMetrics, run_ids: Sequence[str], now: Callable[[], float]
) -> dict[str, Route]:
    """The routes to hand to :class:`bootstrap.health.HealthServer`.

    Args:
        board: the verified records and histories the poller keeps.
        metrics: renders ``/metrics``.
        run_ids: the runs named with ``--run-id`` (the first is shown by default).
        now: DHT time.
    """
    page = resources.files("bootstrap").joinpath(PAGE_FILE).read_bytes()

    def index(query: dict[str, str]) -> Response:
        return HTTPStatus.OK, "text/html; charset=utf-8", page

    def swarm(query: dict[str, str]) -> Response:
        run_id = query.get("run") or (run_ids[0] if run_ids else None)
        if run_id is not None and (len(run_id) > 128 or not run_id.isprintable()):
            raise BadRequest("run must be a run id of 1-128 printable characters")
        if run_id is not None and run_id not in run_ids and run_id not in board.runs():
            body = json.dumps({"error": "no such run", "runs": board.runs()}).encode()
            return HTTPStatus.NOT_FOUND, "application/json", body
        return HTTPStatus.OK, "application/json", json.dumps(board.document(run_id, now())).encode()

    def prometheus(query: dict[str, str]) -> Response:
        return HTTPStatus.OK, CONTENT_TYPE_LATEST, metrics.render()

    return {"/": index, "/index.html": index, "/api/swarm": swarm, "/metrics": prometheus}
