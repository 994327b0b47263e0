"""The trainer's side of the contribution ledger: a signed receipt per group round, a fresh summary in the DHT.

After each round the trainer calls ``ContributionLedger.credit``. When the round's aggregation
returned a group whose agreed contributor set names this node (it landed as ``group``, or was
gated as ``rejected``: its update is in the group's sum either way), a receipt is signed and
appended to ``<workdir>/ledger.jsonl`` (node/ledger/receipts.py), with the group's consistency
certificate when the aggregation was secure (``AggregationResult.certificate``). Rounds applied alone, resyncs
and downloads earn none.

The summary of the receipts (dht/ledger.py) is published by ``SummaryPublisher``, a background
thread like the record's heartbeat (dht/swarm.py ``Heartbeat``): nudged after each new receipt and
every ``refresh`` seconds otherwise, so the entry (signed for ``SUMMARY_TTL``) never lapses while
the node lives. After each publish it reads the run's summaries back and keeps the verified ones in
``<workdir>/ledger_summaries.json``, which ``zen-node export`` turns into the model card's
contributors table: the card credits nodes that have left the swarm since.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import hivemind
from hivemind.utils import get_dht_time

from dht.ledger import SUMMARY_TTL, LedgerSummary, SummaryEntry, list_summaries, publish_summary
from node.aggregation.base import AggregationResult
from node.config import NodeConfig
from node.ledger.contributors import write_summaries_cache
from node.ledger.receipts import (
    Receipt,
    SignedReceipt,
    Totals,
    append_receipt,
    contributors_digest,
    read_receipts,
    sign_receipt,
    verify_receipt,
)
from node.runtime import NodeRuntime
from node.training.outer import InFlight
from node.training.report import RoundOutcome, RoundReport

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 300.0  # the summary is republished at least this often (its ttl is SUMMARY_TTL)


class ContributionLedger:
    """Receipts for the rounds this node gave to a group, and its signed summary in the DHT.

    Args:
        config: the node's configuration (workdir, run, display name).
        refresh: seconds between summary refreshes when no round finishes.
    """

    def __init__(self, config: NodeConfig, refresh: float = REFRESH_SECONDS):
        self.workdir = config.workdir_path
        self.run = config.run
        self.run_hash = config.run.digest()
        self.display_name = config.display_name
        self.refresh = refresh
        self._totals: Totals | None = None  # the receipts' running summary, read from ledger.jsonl on first use
        self._runtime: NodeRuntime | None = None  # signs and publishes (set by the first credit)
        self._publisher: SummaryPublisher | None = None
        self._lock = threading.Lock()  # the totals: written by credit, read by the publisher's thread

    def totals(self) -> Totals:
        """The running summary of this node's receipts of the run (verified lines only)."""
        with self._lock:
            if self._totals is None:
                receipts, failed = read_receipts(self.workdir, self.run_hash)
                if failed:
                    logger.warning(f"{failed} receipt line(s) in {self.workdir} did not verify; not counted")
                self._totals = Totals()
                for signed in receipts:
                    self._totals = self._totals.add(signed)
            return self._totals

    def credit(self, runtime: NodeRuntime, report: RoundReport, flight: InFlight | None) -> SignedReceipt | None:
        """Sign a receipt if this round's update went into a group's sum; return it (None: no contribution)."""
        result = _group_result(flight)
        identity = runtime.identity
        if flight is None or result is None or identity.peer_id not in result.peers:
            return None
        receipt = Receipt(
            peer_id=identity.peer_id,
            signing_key=identity.signing_public_key,
            binding=identity.binding,
            run_id=self.run.run_id,
            run_hash=self.run_hash,
            round=result.round,
            group_id=result.group_id,
            contributors=tuple(sorted(result.peers)),
            contributors_digest=contributors_digest(
                result.group_id, result.round, result.peers, result.key_fingerprints
            ),
            samples=flight.samples,
            compute_seconds=round(max(0.0, report.utilization * report.seconds), 3),
            outcome=str(report.mode),
            timestamp=time.time(),
            certificate=result.certificate,
        )
        line = sign_receipt(identity, receipt)
        append_receipt(self.workdir, line)
        signed = verify_receipt(line)
        totals = self.totals()
        with self._lock:
            self._totals = totals.add(signed)
        self._publisher_for(runtime).soon()
        return signed

    def summary(self) -> bytes | None:
        """This node's summary, signed now (None before its first receipt or before the first credit)."""
        totals, runtime = self.totals(), self._runtime
        if runtime is None or not totals.rounds:
            return None
        return LedgerSummary(
            peer_id=runtime.identity.peer_id,
            signing_key=runtime.identity.signing_public_key,
            binding=runtime.identity.binding,
            run_id=self.run.run_id,
            run_hash=self.run_hash,
            rounds=totals.rounds,
            samples=totals.samples,
            compute_seconds=totals.compute_seconds,
            last_round=totals.last_round,
            receipts_digest=totals.receipts_digest,
            timestamp=get_dht_time(),
            ttl=SUMMARY_TTL,
            display_name=self.display_name,
        ).sign(runtime.identity)

    def _publisher_for(self, runtime: NodeRuntime) -> SummaryPublisher:
        if self._publisher is None:
            self._runtime = runtime
            self._publisher = SummaryPublisher(runtime.dht, self.run.run_id, self.summary, self._keep, self.refresh)
            runtime.adopt("ledger summary", self._publisher.stop)
            self._publisher.start()
        return self._publisher

    def _keep(self, entries: list[SummaryEntry]) -> None:
        write_summaries_cache(self.workdir, entries)


def _group_result(flight: InFlight | None) -> AggregationResult | None:
    """The group a landed round's update went into (None: applied alone, resynced, stopped)."""
    if flight is None or not flight.future.done() or flight.future.exception() is not None:
        return None
    mode, outcome = flight.future.result()
    return outcome if mode is RoundOutcome.GROUP and isinstance(outcome, AggregationResult) else None


class SummaryPublisher:
    """Publish a node's ledger summary from a background thread: when nudged, and every ``period`` seconds.

    Args:
        dht: a started DHT.
        run_id: the run whose ledger key holds the summary.
        make_summary: the signed summary now (None: nothing to publish yet).
        on_read: called with the run's entries read back after each publish.
        period: seconds between refreshes without a nudge.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        make_summary: Callable[[], bytes | None],
        on_read: Callable[[list[SummaryEntry]], None],
        period: float = REFRESH_SECONDS,
    ):
        self.dht, self.run_id, self.make_summary, self.on_read, self.period = dht, run_id, make_summary, on_read, period
        self.published = 0  # summaries a DHT peer accepted
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pending = threading.Event()  # a nudge not yet published (stop() publishes it: the last round counts)
        self._thread = threading.Thread(target=self._run, name="zen-ledger", daemon=True)

    def start(self) -> SummaryPublisher:
        self._thread.start()
        return self

    def soon(self) -> None:
        """Publish from the background thread now, without waiting."""
        self._pending.set()
        self._wake.set()

    def publish(self) -> bool:
        """Publish the summary now and keep what the run's ledger key holds; whether a DHT peer stored it."""
        self._pending.clear()
        envelope = self.make_summary()
        if envelope is None:
            return False
        ok = publish_summary(self.dht, envelope)
        self.published += int(ok)
        if not ok:
            logger.warning("ledger: no DHT peer stored our summary (will retry)")
        self.on_read(list_summaries(self.dht, self.run_id))
        return ok

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.period)
            if self._stop.is_set():
                break
            self._wake.clear()
            try:
                self.publish()
            except Exception as e:  # a failed refresh must not kill the node; the next one retries
                logger.warning(f"ledger summary refresh failed: {e}")

    def stop(self) -> None:
        """Stop the thread; a nudge it had not published yet is published now (before the DHT goes)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._pending.is_set():
            try:
                self.publish()
            except Exception as e:
                logger.warning(f"could not publish the last ledger summary: {e}")
