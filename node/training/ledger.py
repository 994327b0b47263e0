"""The trainer's side of the contribution ledger: a signed receipt per round given, a summary in the DHT.

After each round the trainer calls ``ContributionLedger.credit``. When the round's aggregation
returned a group whose agreed contributor set names this node (it landed as ``group``, or was
gated as ``rejected``: its update is in the group's sum either way), a receipt is signed and
appended to ``<workdir>/ledger.jsonl`` (node/ledger/receipts.py), with the group's consistency
certificate when the aggregation was secure (``AggregationResult.certificate``). Rounds applied alone, resyncs
and downloads earn none. A sharded trainer calls ``credit_steps`` for each ``train.inner_steps`` steps it
committed: the receipt names the group its own parts averaged in at their end, if one did, else it is of
outcome ``sharded`` (node/ledger/receipts.py).

The summary of the receipts (dht/ledger.py) is published by ``SummaryPublisher``, a background
thread like the record's heartbeat (dht/swarm.py ``Heartbeat``). Publishing is the costliest DHT
operation of a small round: a store first looks the key up, and a lookup returns every node's summary
under the run's ledger key; with LoRA adapters of 14 KB the summary's publish and read-back once a round
were about a third of a peer's DHT operations (BENCHMARKS.md). So a new receipt is published once
``every_rounds`` (10) receipts wait or ``every_seconds`` (60 s) after the last publish, whichever comes
first; at once for the first receipt and for the run's last round (``node.rounds``); and when the node
stops, if any waits. Without new receipts the summary is re-signed every ``refresh`` seconds, so the
entry (signed for ``SUMMARY_TTL``) never lapses while the node lives. What the DHT shows is therefore
up to 10 rounds or 60 s behind ``ledger.jsonl`` while a node trains, and complete once it stopped.
After each publish the publisher reads the run's summaries back (the only read) and keeps the
verified ones in ``<workdir>/ledger_summaries.json``, which ``zen-node export`` turns into the model
card's contributors table: the card credits nodes that have left the swarm since.
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
    SHARDED,
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
PUBLISH_ROUNDS = 10  # a new summary is published once this many receipts wait ...
PUBLISH_SECONDS = 60.0  # ... or this long after the last publish, whichever comes first (module docstring)


class ContributionLedger:
    """Receipts for the rounds this node gave, and its signed summary in the DHT.

    Args:
        config: the node's configuration (workdir, run, display name, rounds: the last one publishes at once).
        refresh: seconds between summary refreshes when no round finishes.
        every_rounds, every_seconds: a new receipt is published once this many wait or this long after the
            last publish, whichever comes first (module docstring).
    """

    def __init__(
        self,
        config: NodeConfig,
        refresh: float = REFRESH_SECONDS,
        every_rounds: int = PUBLISH_ROUNDS,
        every_seconds: float = PUBLISH_SECONDS,
    ):
        self.workdir = config.workdir_path
        self.run = config.run
        self.run_hash = config.run.digest()
        self.display_name = config.display_name
        self.last_round = config.rounds  # the run's last round here (0: none); its receipt is published at once
        self.refresh, self.every_rounds, self.every_seconds = refresh, every_rounds, every_seconds
        self._totals: Totals | None = None  # the receipts' running summary, read from ledger.jsonl on first use
        self._runtime: NodeRuntime | None = None  # signs and publishes (set by the first credit)
        self._publisher: SummaryPublisher | None = None
        self._lock = threading.Lock()  # the totals: written by credit, read by the publisher's thread

    @property
    def publisher(self) -> SummaryPublisher | None:
        """The summary's publisher, started by the first receipt (None before)."""
        return self._publisher

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
        receipt = self._group_receipt(runtime, result, flight.samples, report.utilization * report.seconds, report.mode)
        return self._keep(runtime, receipt, final=bool(self.last_round) and result.round >= self.last_round)

    def credit_steps(
        self,
        runtime: NodeRuntime,
        samples: int,
        seconds: float,
        final: bool = False,
        group: tuple[AggregationResult, RoundOutcome] | None = None,
    ) -> SignedReceipt:
        """Sign a sharded trainer's receipt for steps it committed to the stage servers; ``final``: the trainer's
        last, published at once. ``group``: the group its own parts averaged in at the end of those steps, and how
        that landed: the receipt names it as a group receipt does (U, group id, certificate), unless it names
        another node set or a round the ledger already counted; otherwise U is this node alone (outcome
        ``sharded``), numbered on from the ledger's last round."""
        round_no = self.totals().last_round + 1
        if group is not None and runtime.identity.peer_id in group[0].peers and group[0].round >= round_no:
            return self._keep(runtime, self._group_receipt(runtime, group[0], samples, seconds, group[1]), final)
        receipt = self._receipt(
            runtime,
            round_no=round_no,
            group_id="",
            peers=(runtime.identity.peer_id,),
            fingerprints=(),
            samples=samples,
            compute_seconds=max(0.0, seconds),
            outcome=SHARDED,
            certificate=b"",
        )
        return self._keep(runtime, receipt, final)

    def _group_receipt(
        self, runtime: NodeRuntime, result: AggregationResult, samples: int, seconds: float, mode: RoundOutcome
    ) -> Receipt:
        """The receipt of a round whose update went into ``result``'s group (U, group id, its certificate)."""
        return self._receipt(
            runtime,
            round_no=result.round,
            group_id=result.group_id,
            peers=result.peers,
            fingerprints=result.key_fingerprints,
            samples=samples,
            compute_seconds=max(0.0, seconds),
            outcome=str(mode),
            certificate=result.certificate,
        )

    def _receipt(
        self,
        runtime: NodeRuntime,
        *,
        round_no: int,
        group_id: str,
        peers: tuple[str, ...],
        fingerprints: tuple[str, ...],
        samples: int,
        compute_seconds: float,
        outcome: str,
        certificate: bytes,
    ) -> Receipt:
        identity = runtime.identity
        return Receipt(
            peer_id=identity.peer_id,
            signing_key=identity.signing_public_key,
            binding=identity.binding,
            run_id=self.run.run_id,
            run_hash=self.run_hash,
            round=round_no,
            group_id=group_id,
            contributors=tuple(sorted(peers)),
            contributors_digest=contributors_digest(group_id, round_no, peers, fingerprints),
            samples=samples,
            compute_seconds=round(compute_seconds, 3),
            outcome=outcome,
            timestamp=time.time(),
            certificate=certificate,
        )

    def _keep(self, runtime: NodeRuntime, receipt: Receipt, final: bool) -> SignedReceipt:
        """Sign and append ``receipt``, count it, and tell the publisher (``final``: publish it at once)."""
        line = sign_receipt(runtime.identity, receipt)
        append_receipt(self.workdir, line)
        signed = verify_receipt(line)
        totals = self.totals()
        with self._lock:
            self._totals = totals.add(signed)
        self._publisher_for(runtime).note_receipt(final)
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
            self._publisher = SummaryPublisher(
                runtime.dht,
                self.run.run_id,
                self.summary,
                self._cache,
                period=self.refresh,
                every_rounds=self.every_rounds,
                every_seconds=self.every_seconds,
            )
            runtime.adopt("ledger summary", self._publisher.stop)
            self._publisher.start()
        return self._publisher

    def _cache(self, entries: list[SummaryEntry]) -> None:
        write_summaries_cache(self.workdir, entries)


def _group_result(flight: InFlight | None) -> AggregationResult | None:
    """The group a landed round's update went into (None: applied alone, resynced, stopped)."""
    if flight is None or not flight.future.done() or flight.future.exception() is not None:
        return None
    mode, outcome = flight.future.result()
    return outcome if mode is RoundOutcome.GROUP and isinstance(outcome, AggregationResult) else None


class SummaryPublisher:
    """Publish a node's ledger summary from a background thread, at most as often as the module docstring says.

    Args:
        dht: a started DHT.
        run_id: the run whose ledger key holds the summary.
        make_summary: the signed summary now (None: nothing to publish yet).
        on_read: called with the run's entries read back after each publish.
        period: seconds between refreshes without a new receipt.
        every_rounds, every_seconds: a new receipt is published once this many wait, or this long after the
            last publish, whichever comes first; the first receipt and a final one at once.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        make_summary: Callable[[], bytes | None],
        on_read: Callable[[list[SummaryEntry]], None],
        period: float = REFRESH_SECONDS,
        every_rounds: int = PUBLISH_ROUNDS,
        every_seconds: float = PUBLISH_SECONDS,
    ):
        self.dht, self.run_id, self.make_summary, self.on_read = dht, run_id, make_summary, on_read
        self.period, self.every_rounds, self.every_seconds = period, max(1, every_rounds), every_seconds
        self.published = 0  # summaries a DHT peer accepted
        self.reads = 0  # read-backs of the run's summaries (one per publish)
        self._lock = threading.Lock()  # what waits: written by the trainer's thread, read by ours
        self._waiting = 0  # receipts not yet in a published summary
        self._final = False  # the last round's receipt waits: publish at once
        self._last: float | None = None  # time.monotonic() of the last publish (None: never)
        self._busy = False  # a publish is under way
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zen-ledger", daemon=True)

    def start(self) -> SummaryPublisher:
        self._thread.start()
        return self

    def note_receipt(self, final: bool = False) -> None:
        """A new receipt: published when due (``final``: at once)."""
        with self._lock:
            self._waiting += 1
            self._final = self._final or final
        self._wake.set()

    def due_in(self) -> float | None:
        """Seconds until the next publish is due (0.0: now; None: not before a new receipt)."""
        with self._lock:
            waiting, final, last = self._waiting, self._final, self._last
        if waiting and (final or last is None or waiting >= self.every_rounds):
            return 0.0
        if last is None:
            return None
        return max(0.0, last + (self.every_seconds if waiting else self.period) - time.monotonic())

    def settled(self) -> bool:
        """Whether no publish is under way or due now (what a receipt asked for has been done)."""
        with self._lock:
            busy = self._busy
        return not busy and self.due_in() != 0.0

    def publish(self) -> bool:
        """Publish the summary now and keep what the run's ledger key holds; whether a DHT peer stored it."""
        with self._lock:
            waiting, self._waiting, self._final, self._last = self._waiting, 0, False, time.monotonic()
            self._busy = True
        try:
            envelope = self.make_summary()
            if envelope is None:
                return False
            ok = publish_summary(self.dht, envelope)
            self.published += int(ok)
            if not ok:
                logger.warning("ledger: no DHT peer stored our summary (will retry)")
                self._retry(waiting)
            self.reads += 1
            self.on_read(list_summaries(self.dht, self.run_id))
            return ok
        except Exception:
            self._retry(waiting)
            raise
        finally:
            with self._lock:
                self._busy = False

    def _retry(self, waiting: int) -> None:
        """Receipts a failed publish did not carry wait again: retried ``every_seconds`` later."""
        if waiting:
            with self._lock:
                self._waiting = max(self._waiting, 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.due_in())
            self._wake.clear()
            if self._stop.is_set():
                break
            if self.due_in() != 0.0:
                continue
            try:
                self.publish()
            except Exception as e:  # a failed refresh must not kill the node; the next one retries
                logger.warning(f"ledger summary refresh failed: {e}")

    def stop(self) -> None:
        """Stop the thread; receipts not published yet are published now (before the DHT goes)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self._lock:
            waiting = self._waiting
        if waiting:
            try:
                self.publish()
            except Exception as e:
                logger.warning(f"could not publish the last ledger summary: {e}")
