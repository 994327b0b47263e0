"""What the dashboard shows: ``GET /api/swarm`` built from verified peer records, and their round history.

Everything here starts from :class:`dht.PeerRecord` objects that ``dht.list_peers`` returned, so every
record's signature, key binding and freshness was checked before it reaches this module; nothing a peer
says reaches the page any other way. The bootstrap's poller hands each run's records to
:class:`SwarmBoard` (``update``), which keeps the latest records per run and, for each trainer, a bounded
history of rounds (held-out loss and bytes sent: the record's ``eval_loss`` and ``round_bytes``, and the
last rounds it carries in ``recent_rounds``, so a round shorter than the poll period still gets its point).
:meth:`SwarmBoard.document` builds the JSON body from that state (peers, cohorts, the pipeline stages of
a sharded run with their servers and throughput, contributors, history), in the HTTP thread, without
touching the network.

Bounds: at most ``MAX_RUNS`` runs (least recently updated dropped), ``MAX_PEERS`` peers per run shown and
remembered, ``MAX_ROUNDS`` rounds per peer (oldest dropped), and record strings cut to ``MAX_TEXT`` characters.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dht.cohorts import CohortMatcher
from dht.ledger import LedgerSummary
from dht.records import MAX_STAGES, PeerRecord
from dht.wire import WireError, unpack_bounded

MAX_RUNS = 32  # runs the board remembers
MAX_PEERS = 512  # peers per run shown and remembered
MAX_ROUNDS = 200  # rounds of history per peer
MAX_TEXT = 200  # characters of a record's free text (device name, version) shown


@dataclass
class _RunState:
    records: list[PeerRecord]  # the latest verified records of the run, sorted by PeerID
    updated: float  # time.time() of the poll that read them
    history: OrderedDict[str, OrderedDict[int, tuple[float, int]]]  # PeerID -> round -> (loss, bytes)
    cohorts: list[dict[str, Any]] | None = None  # the cohorts of ``records``, computed once per change of them
    summaries: list[LedgerSummary] | None = None  # the run's verified ledger summaries (dht/ledger.py)


class SwarmBoard:
    """The latest verified records of each run and each trainer's bounded round history. Thread-safe."""

    def __init__(self, max_runs: int = MAX_RUNS, max_peers: int = MAX_PEERS, max_rounds: int = MAX_ROUNDS):
        self.max_runs, self.max_peers, self.max_rounds = max_runs, max_peers, max_rounds
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, _RunState] = OrderedDict()

    def update(self, run_id: str, records: Sequence[PeerRecord]) -> None:
        """Take a poll's verified records of ``run_id``; remember each trainer's (round, loss, bytes)."""
        records = sorted(records, key=lambda r: r.peer_id)[: self.max_peers]
        with self._lock:
            state = self._runs.pop(run_id, None) or _RunState([], 0.0, OrderedDict())
            self._runs[run_id] = state
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
            if _cohort_key(records) != _cohort_key(state.records):
                state.cohorts = None  # clustering is the costly part of a request: redo it only on change
            state.records, state.updated = records, time.time()
            for record in records:
                if "trainer" in record.roles:
                    self._remember(state, record)

    def update_ledger(self, run_id: str, summaries: Sequence[LedgerSummary]) -> None:
        """Take a poll's verified ledger summaries of ``run_id`` (dht.list_summaries), at most ``max_peers``."""
        with self._lock:
            state = self._runs.get(run_id)
            if state is not None:
                state.summaries = sorted(summaries, key=lambda s: s.peer_id)[: self.max_peers]

    def _remember(self, state: _RunState, record: PeerRecord) -> None:
        """Keep the record's rounds: those it carries (``recent_rounds``: rounds that ended between two
        polls) and its latest; a round without a held-out loss is not charted."""
        points = [*record.recent_rounds, (record.round, record.eval_loss, record.round_bytes)]
        points = [(r, float(loss), int(sent)) for r, loss, sent in points if loss >= 0]
        if not points:
            return
        rounds = state.history.pop(record.peer_id, None) or OrderedDict()
        state.history[record.peer_id] = rounds  # most recently heard from last
        while len(state.history) > self.max_peers:
            state.history.popitem(last=False)
        for round_no, loss, sent in points:
            rounds[round_no] = (loss, sent)  # a later record overwrites
        while len(rounds) > self.max_rounds:
            del rounds[min(rounds)]

    def runs(self) -> list[str]:
        """The run ids the board holds records of, sorted."""
        with self._lock:
            return sorted(run_id for run_id, state in self._runs.items() if state.records)

    def peer_counts(self) -> dict[str, Counter[str]]:
        """Run id -> how many live records name each role (for metrics)."""
        with self._lock:
            return {run_id: Counter(role for r in s.records for role in r.roles) for run_id, s in self._runs.items()}

    def document(self, run_id: str | None, now: float) -> dict[str, Any]:
        """The ``/api/swarm`` body: one run in full (``run_id``, or the only one), and the list of runs.

        Args:
            run_id: the run to show; None shows the only run held, or none when there are several.
            now: DHT time, to say how long ago each record was signed.
        """
        runs = self.runs()
        if run_id is None and len(runs) == 1:
            run_id = runs[0]
        with self._lock:
            state = self._runs.get(run_id) if run_id is not None else None
            records = list(state.records) if state is not None else []
            history = {p: list(rounds.items()) for p, rounds in state.history.items()} if state is not None else {}
            updated = state.updated if state is not None else None
            cohorts = state.cohorts if state is not None else []
            summaries = list(state.summaries or []) if state is not None else []
        if cohorts is None and run_id is not None:
            cohorts = _cohorts_json(run_id, records)
            with self._lock:
                if state is not None and _cohort_key(state.records) == _cohort_key(records):
                    state.cohorts = cohorts
        body: dict[str, Any] = {"runs": runs, "run_id": run_id, "updated": updated}
        body["peers"] = [_peer_json(record, now) for record in records]
        body["cohorts"] = cohorts or []
        body["stages"] = _stages_json(records, now)
        body["contributors"] = _contributors_json(summaries, _majority_hash(records))
        body["history"] = {
            peer_id: [{"round": r, "eval_loss": loss, "bytes": sent} for r, (loss, sent) in sorted(rounds)]
            for peer_id, rounds in sorted(history.items())
        }
        return body


def _text(value: str) -> str:
    return value[:MAX_TEXT]


def _peer_json(record: PeerRecord, now: float) -> dict[str, Any]:
    return {
        "peer_id": record.peer_id,
        "roles": list(record.roles),
        "device": record.capacity.device_kind,
        "device_name": _text(record.capacity.device_name),
        "version": _text(record.version),
        "run_hash": record.run_hash[:16],
        "round": record.round,
        "heartbeat_seconds_ago": round(max(0.0, now - record.timestamp), 1),
        "epsilon": None if record.epsilon < 0 else record.epsilon,
        "eval_loss": None if record.eval_loss < 0 else record.eval_loss,
        "round_bytes": record.round_bytes,
        "samples_per_second": record.capacity.samples_per_second,
        "stages": list(record.stages),
    }


def _majority_hash(records: Sequence[PeerRecord], role: str = "trainer") -> str | None:
    """The run hash most records of ``role`` announce (ties: the smallest), None without such records."""
    hashes = Counter(r.run_hash for r in records if role in r.roles)
    return min(hashes, key=lambda h: (-hashes[h], h)) if hashes else None


def _stages_json(records: Sequence[PeerRecord], now: float) -> list[dict[str, Any]]:
    """Each pipeline stage of a sharded run: its servers and their throughput, the weakest stage marked.

    A stage's capacity is the sum of its servers' measured samples/s (the rule block selection uses,
    node/sharding/stages.py); what it served is each server's ``served_per_second`` shared evenly among
    the stages it hosts. Servers count only under the run hash most trainers (else servers) announce, and
    the stages are those the signed run config names (else up to the highest announced).
    """
    run_hash = _majority_hash(records) or _majority_hash(records, "server")
    servers = [r for r in records if "server" in r.roles and r.run_hash == run_hash]
    if not servers:
        return []
    config = next((r.run_config for r in records if r.run_hash == run_hash and r.run_config), b"")
    count = _configured_stages(config) or max((s + 1 for r in servers for s in r.stages), default=0)
    stages: list[dict[str, Any]] = []
    for stage in range(min(count, MAX_STAGES)):
        hosts = [r for r in servers if stage in r.stages]
        served = [r.served_per_second / len(r.stages) for r in hosts if r.served_per_second >= 0]
        stages.append(
            {
                "stage": stage,
                "servers": [_server_json(r, now) for r in hosts],
                "samples_per_second": sum(r.capacity.samples_per_second for r in hosts),
                "served_per_second": sum(served) if served else None,
                "weakest": False,
            }
        )
    weakest = min(stages, key=lambda s: (s["samples_per_second"], s["stage"]))
    weakest["weakest"] = True
    return stages


def _server_json(record: PeerRecord, now: float) -> dict[str, Any]:
    return {
        "peer_id": record.peer_id,
        "version": record.round,
        "device": record.capacity.device_kind,
        "samples_per_second": record.capacity.samples_per_second,
        "served_per_second": None if record.served_per_second < 0 else record.served_per_second,
        "heartbeat_seconds_ago": round(max(0.0, now - record.timestamp), 1),
    }


def _configured_stages(run_config: bytes) -> int:
    """``[run.sharding] stages`` of a signed run config; 0 when it does not say (or says nonsense)."""
    config = _run_config(run_config)
    sharding = config.get("sharding") if config is not None else None
    stages = sharding.get("stages") if isinstance(sharding, dict) else None
    return stages if isinstance(stages, int) and not isinstance(stages, bool) and 0 < stages <= MAX_STAGES else 0


def _contributors_json(summaries: Sequence[LedgerSummary], run_hash: str | None) -> list[dict[str, Any]]:
    """Each contributor's signed summary and its shares of the run's samples and rounds.

    Only summaries made under the run hash most trainers announce count (another config's claims are
    for another model); ``dht.list_summaries`` has checked every signature before they got here.
    """
    counted = [s for s in summaries if run_hash is None or s.run_hash == run_hash]
    samples, rounds = sum(s.samples for s in counted), sum(s.rounds for s in counted)
    return [
        {
            "peer_id": s.peer_id,
            "display_name": _text(s.display_name),
            "rounds": s.rounds,
            "samples": s.samples,
            "compute_seconds": round(s.compute_seconds, 1),
            "share_of_samples": s.samples / samples if samples else 0.0,
            "share_of_rounds": s.rounds / rounds if rounds else 0.0,
        }
        for s in counted
    ]


def _cohort_key(records: Sequence[PeerRecord]) -> list[tuple[str, str, tuple[str, ...], bytes]]:
    """What the cohorts depend on; the rest of a record (round, timestamp) changes at every heartbeat."""
    return [(r.peer_id, r.run_hash, r.roles, r.sketch) for r in records]


def _cohorts_json(run_id: str, records: Sequence[PeerRecord]) -> list[dict[str, Any]]:
    """The cohorts by the run's own rule (from the majority run hash's signed run config)."""
    run_hash = _majority_hash(records)
    if run_hash is None:
        return []
    config = next((r.run_config for r in records if r.run_hash == run_hash and r.run_config), b"")
    cohorts = CohortMatcher(run_id, **_cohort_options(config)).cohorts(records, run_hash)
    return [{"cohort_id": c.cohort_id, "members": list(c.members)} for c in cohorts]


def _run_config(run_config: bytes) -> dict[str, Any] | None:
    """A signed record's run config as a map (bounded decode), None when it is not one."""
    try:
        config = unpack_bounded(run_config, max_str=4096, max_bin=4096, max_array=256, max_map=64)
    except WireError:
        return None
    return config if isinstance(config, dict) else None


def _cohort_options(run_config: bytes) -> dict[str, Any]:
    """CohortMatcher's options from a signed run config; the defaults when it does not say."""
    config = _run_config(run_config)
    if config is None:
        return {}
    cohorts, aggregation = config.get("cohorts"), config.get("aggregation")
    options: dict[str, Any] = {}
    if isinstance(cohorts, dict):
        threshold, separation = cohorts.get("distance_threshold"), cohorts.get("min_separation")
        if isinstance(threshold, int | float) and not isinstance(threshold, bool) and 0 <= threshold <= 2:
            options["distance_threshold"] = float(threshold)
        if isinstance(separation, int | float) and not isinstance(separation, bool) and 1 < separation < 1e6:
            options["min_separation"] = float(separation)
    if isinstance(aggregation, dict):
        size = aggregation.get("min_group_size")
        if isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 1024:
            options["min_cohort"] = size
    return options
