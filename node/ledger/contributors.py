"""The contributors of a run, from the ledger: one row per node with its figures, shares and whether they verify.

Where the figures come from:

- the run's summaries in the DHT (``zen-node ledger``: :func:`claims_from_entries`), or the copy a
  trainer keeps of them in its workdir (``ledger_summaries.json``, :func:`read_summaries_cache`), each
  signed by its node (dht/ledger.py);
- a node's own receipts (``ledger.jsonl``, node/ledger/receipts.py), for its own row in its model card.

A claim that does not verify (a bad signature or binding, a summary of another run configuration,
an expired or malformed entry) is listed, marked ``verified = False`` with the reason, and counts
for no share: shares divide each verified contributor's samples (rounds) by the sum over verified
contributors, so a forged claim can neither appear as credit nor dilute anyone's.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dht.ledger import LedgerError, LedgerSummary, SummaryEntry, claimed_summary
from node.ledger.receipts import SignedReceipt, totals

logger = logging.getLogger(__name__)

SUMMARIES_FILE = "ledger_summaries.json"  # a trainer's copy of its run's signed summaries, refreshed each round
MAX_CACHED = 4096  # summaries kept in that copy
COLUMNS = (
    "peer_id",
    "display_name",
    "rounds",
    "samples",
    "compute_seconds",
    "share_of_samples",
    "share_of_rounds",
    "verified",
    "note",
    "attested_rounds",
)


@dataclass(frozen=True)
class Claim:
    """What one node claims to have contributed, and whether that claim verified."""

    peer_id: str
    rounds: int | None  # None: the entry did not even decode
    samples: int | None
    compute_seconds: float | None
    verified: bool
    note: str = ""  # why it did not verify (or what a receipt audit found)
    display_name: str = ""
    receipts_digest: bytes = b""  # the summary's chain over its receipts (b"": not from a summary)
    attested_rounds: int | None = None  # rounds presented certificates name it in (None: none presented)


@dataclass(frozen=True)
class ContributorRow:
    """One line of ``zen-node ledger`` and of the model card's contributors table."""

    peer_id: str
    display_name: str
    rounds: int | None
    samples: int | None
    compute_seconds: float | None
    share_of_samples: float | None  # None for an unverified claim
    share_of_rounds: float | None
    verified: bool
    note: str
    attested_rounds: int | None = None  # rounds verified certificates of presented receipts name it in (audit.py)


def claim_from_summary(summary: LedgerSummary, run_hash: str | None) -> Claim:
    """A verified summary's claim; one signed for another run configuration is marked unverified."""
    note = "" if run_hash is None or summary.run_hash == run_hash else f"signed for run hash {summary.run_hash[:16]}"
    return Claim(
        summary.peer_id,
        summary.rounds,
        summary.samples,
        summary.compute_seconds,
        not note,
        note,
        summary.display_name,
        summary.receipts_digest,
    )


def claims_from_entries(entries: Iterable[SummaryEntry], run_hash: str | None) -> list[Claim]:
    """One claim per DHT entry: verified summaries, and what the others claimed (marked, with the reason)."""
    claims = []
    for entry in entries:
        if entry.summary is not None:
            claims.append(claim_from_summary(entry.summary, run_hash))
            continue
        claimed = claimed_summary(entry.envelope)
        note = entry.error or "does not verify"
        if claimed is None:
            claims.append(Claim(entry.subkey, None, None, None, False, note))
        else:
            claims.append(Claim(entry.subkey, claimed.rounds, claimed.samples, claimed.compute_seconds, False, note))
    return claims


def claim_from_receipts(peer_id: str, receipts: Sequence[SignedReceipt], failed: int = 0) -> Claim:
    """A node's own claim from its verified receipts; ``failed`` lines that did not verify are noted."""
    total = totals(receipts)
    note = f"{failed} receipt line(s) did not verify and are not counted" if failed else ""
    return Claim(peer_id, total.rounds, total.samples, total.compute_seconds, True, note)


def contributor_rows(claims: Iterable[Claim]) -> list[ContributorRow]:
    """The rows, verified first by samples (most first), then the unverified; shares over verified claims only.

    A PeerID with several claims keeps the verified one with the most rounds (a reader may see an
    older copy of a summary next to a newer one).
    """
    best: dict[str, Claim] = {}
    for claim in claims:
        held = best.get(claim.peer_id)
        if held is None or _rank(claim) > _rank(held):
            best[claim.peer_id] = claim
    verified = [c for c in best.values() if c.verified]
    all_samples = sum(c.samples or 0 for c in verified)
    all_rounds = sum(c.rounds or 0 for c in verified)
    rows = [
        ContributorRow(
            peer_id=c.peer_id,
            display_name=c.display_name,
            rounds=c.rounds,
            samples=c.samples,
            compute_seconds=c.compute_seconds,
            share_of_samples=_share(c.samples, all_samples) if c.verified else None,
            share_of_rounds=_share(c.rounds, all_rounds) if c.verified else None,
            verified=c.verified,
            note=c.note,
            attested_rounds=c.attested_rounds,
        )
        for c in best.values()
    ]
    return sorted(rows, key=lambda r: (not r.verified, -(r.samples or 0), -(r.rounds or 0), r.peer_id))


def _rank(claim: Claim) -> tuple[bool, int, int]:
    return claim.verified, claim.rounds or 0, claim.samples or 0


def _share(part: int | None, whole: int) -> float:
    return round((part or 0) / whole, 6) if whole else 0.0


def rows_as_json(rows: Sequence[ContributorRow]) -> str:
    """One JSON object per contributor, one per line (as ``zen-node status --json``)."""
    return "".join(json.dumps(asdict(row)) + "\n" for row in rows)


def rows_as_csv(rows: Sequence[ContributorRow]) -> str:
    """CSV with a header line; an unknown figure or share is an empty cell, ``verified`` is true/false."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        values = asdict(row)
        writer.writerow(
            [str(values[c]).lower() if c == "verified" else "" if values[c] is None else values[c] for c in COLUMNS]
        )
    return out.getvalue()


def rows_as_text(rows: Sequence[ContributorRow], run_id: str) -> str:
    """A table for people; unverified claims say so, with the reason."""
    lines = [f"run {run_id!r}: {sum(r.verified for r in rows)} verified contributor(s), {len(rows)} claim(s)"]
    lines.append(
        f"{'peer id':54s} {'rounds':>7s} {'samples':>10s} {'compute s':>10s} {'samples %':>9s} {'rounds %':>8s}"
    )
    for row in rows:
        figures = f"{_text(row.rounds):>7s} {_text(row.samples):>10s} {_text(row.compute_seconds, '.1f'):>10s}"
        shares = f"{_percent(row.share_of_samples):>9s} {_percent(row.share_of_rounds):>8s}"
        name = f" ({row.display_name})" if row.display_name else ""
        mark = f"  ({row.note})" if row.verified and row.note else "" if row.verified else f"  UNVERIFIED: {row.note}"
        lines.append(f"{row.peer_id:54s} {figures} {shares}{name}{mark}")
    return "\n".join(lines) + "\n"


def _text(value: float | None, spec: str = "d") -> str:
    return "-" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def write_summaries_cache(workdir: Path, entries: Iterable[SummaryEntry]) -> None:
    """Keep the verified summaries a trainer read (merged with those kept before: a node that left the
    swarm stays credited) in ``workdir / SUMMARIES_FILE``, written atomically."""
    kept = {e.subkey: (e.summary, e.envelope) for e in _cached(workdir) if e.summary is not None}
    for entry in entries:
        held = kept.get(entry.subkey)
        if entry.summary is not None and (held is None or entry.summary.timestamp >= held[0].timestamp):
            kept[entry.subkey] = (entry.summary, entry.envelope)
    chosen = sorted(kept.items(), key=lambda kv: -kv[1][0].timestamp)[:MAX_CACHED]
    payload = {peer: envelope.hex() for peer, (_, envelope) in sorted(chosen)}
    path = workdir / SUMMARIES_FILE
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps({"summaries": payload}, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


def read_summaries_cache(workdir: Path, run_hash: str | None) -> list[Claim]:
    """The claims of the summaries kept in ``workdir``, verified again (signature, binding, subkey; not
    expiry: they are the run's history); one that fails is a claim marked unverified."""
    return claims_from_entries(_cached(workdir), run_hash)


def _cached(workdir: Path) -> list[SummaryEntry]:
    path = workdir / SUMMARIES_FILE
    if not path.exists():
        return []
    try:
        payload = json.loads(path.read_text())["summaries"]
        envelopes = {str(k): bytes.fromhex(v) for k, v in payload.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning(f"{path} is not a ledger summaries file ({e}); ignored")
        return []
    found = []
    for peer_id, envelope in envelopes.items():
        try:
            summary = LedgerSummary.verify(envelope)
            if summary.peer_id != peer_id:
                raise LedgerError(f"kept under another PeerID than its own {summary.peer_id[:16]}")
            found.append(SummaryEntry(peer_id, envelope, summary))
        except LedgerError as e:
            logger.warning(f"{path}: the summary of {peer_id[:16]} does not verify ({e})")
            found.append(SummaryEntry(peer_id, envelope, None, str(e)))
    return found
